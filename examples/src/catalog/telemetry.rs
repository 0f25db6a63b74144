//! The process's metrics recorder: Prometheus text format.
//!
//! Install it before any channel or breaker is built: the layers register
//! their metric handles when they are made, and handles registered before
//! a recorder exists go nowhere.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// How often histogram samples are folded into their summaries when
/// nobody scrapes `/metrics` (they would pile up otherwise).
const UPKEEP: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder as the global `metrics` recorder (once
/// per process; later calls return the same handle), and starts its upkeep
/// on the calling tokio runtime.
///
/// # Errors
///
/// The exporter's message if another recorder was installed first.
pub fn install() -> Result<PrometheusHandle, String> {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .install_recorder()
                .map_err(|e| format!("cannot install the Prometheus recorder: {e}"))?;
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let upkeep = handle.clone();
                runtime.spawn(async move {
                    let mut every = tokio::time::interval(UPKEEP);
                    loop {
                        every.tick().await;
                        upkeep.run_upkeep();
                    }
                });
            }
            Ok(handle)
        })
        .clone()
}
