//! The process's metrics recorder: Prometheus text format.
//!
//! Install it before any channel or breaker is built: the layers register
//! their metric handles when they are made, and handles registered before
//! a recorder exists go nowhere.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the Prometheus recorder as the global `metrics` recorder (once
/// per process; later calls return the same handle).
///
/// # Errors
///
/// The exporter's message if another recorder was installed first.
pub fn install() -> Result<PrometheusHandle, String> {
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .map_err(|e| format!("cannot install the Prometheus recorder: {e}"))
        })
        .clone()
}
