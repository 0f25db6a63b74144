//! Reloading a config file, once or whenever it changes.

use std::path::Path;

use crate::{ConfigError, ReloadReport, ResilienceConfig};

/// Reads `path` as the new config, with the selectors checked against the
/// same methods as `current`'s, and applies it with `apply`.
pub(crate) fn reload_file(
    current: &ResilienceConfig,
    path: &Path,
    apply: impl FnOnce(&ResilienceConfig) -> Result<ReloadReport, ConfigError>,
) -> Result<ReloadReport, ConfigError> {
    let config = ResilienceConfig::from_file_with_methods(path, current.known_methods())?;
    apply(&config)
}

#[cfg(feature = "watch")]
pub use watcher::ConfigWatcher;

#[cfg(feature = "watch")]
mod watcher {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::Duration;

    use crate::{ConfigError, ReloadReport};

    #[derive(Debug, Default)]
    struct Seen {
        reloads: AtomicU64,
        last_error: Mutex<Option<ConfigError>>,
    }

    /// Reloads a config file whenever its contents change, checking every
    /// `interval` (a polling watcher: no platform file-event API, works on
    /// every file system and in containers). A file that does not parse or
    /// validate is rejected whole: the config in force stays, a WARN says
    /// why, and [`ConfigWatcher::last_error`] holds the error until a good
    /// file arrives. Dropping the watcher stops it.
    ///
    /// Behind the `watch` feature; needs a tokio runtime.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use grpc_resilience::{ConfigWatcher, ResilienceConfig, ResilientChannel};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = ResilienceConfig::from_file("config/resilience.toml")?;
    /// let channel = tonic::transport::Channel::from_static("http://127.0.0.1:50051").connect_lazy();
    /// let channel = ResilientChannel::new(channel, &config)?;
    /// let _watcher = channel.watch_file("config/resilience.toml", Duration::from_secs(5));
    /// # Ok(())
    /// # }
    /// ```
    #[derive(Debug)]
    pub struct ConfigWatcher {
        task: tokio::task::JoinHandle<()>,
        seen: Arc<Seen>,
    }

    impl ConfigWatcher {
        /// Watches `path`, calling `reload` with it when its contents
        /// change. The contents at the time of the call count as seen.
        pub fn spawn<F>(path: impl Into<PathBuf>, interval: Duration, reload: F) -> Self
        where
            F: Fn(&Path) -> Result<ReloadReport, ConfigError> + Send + 'static,
        {
            let path = path.into();
            let seen = Arc::new(Seen::default());
            let task_seen = seen.clone();
            let initial = std::fs::read(&path).ok();
            let task = tokio::spawn(async move {
                let mut last = initial;
                let mut ticks = tokio::time::interval(interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    let Ok(now) = tokio::fs::read(&path).await else {
                        continue;
                    };
                    if last.as_deref() == Some(&now[..]) {
                        continue;
                    }
                    last = Some(now);
                    let mut last_error = task_seen
                        .last_error
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    match reload(&path) {
                        Ok(report) => {
                            task_seen.reloads.fetch_add(1, Ordering::Relaxed);
                            *last_error = None;
                            tracing::info!(
                                path = %path.display(),
                                generation = report.generation(),
                                "resilience config reloaded"
                            );
                        }
                        Err(err) => {
                            tracing::warn!(
                                path = %path.display(),
                                error = %err,
                                "resilience config rejected; the previous one stays"
                            );
                            *last_error = Some(err);
                        }
                    }
                }
            });
            ConfigWatcher { task, seen }
        }

        /// How many times a changed file was applied.
        pub fn reloads(&self) -> u64 {
            self.seen.reloads.load(Ordering::Relaxed)
        }

        /// Why the latest changed file was rejected, until a good one is
        /// applied.
        pub fn last_error(&self) -> Option<ConfigError> {
            self.seen
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        }
    }

    impl Drop for ConfigWatcher {
        fn drop(&mut self) {
            self.task.abort();
        }
    }
}
