//! The layer and its options.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use grpc_resilience_core::{CodeSet, MethodMap, Selector};
use http::HeaderName;
use tonic::Code;
use tower_layer::Layer;

use crate::config::{OnInProgress, OnOversize, OnStoreError, Settings};
use crate::error::ConfigError;
use crate::service::Idempotency;
use crate::stats::{Counters, IdempotencyStats};
use crate::store::{MemoryStore, Store};

/// Makes the named methods of a tonic server idempotent by key.
///
/// Built with the methods it covers; every option has a default (see each
/// `with_*` method). Clones share the store, the settings and the
/// counters. See the [crate docs](crate) for the rules it applies.
pub struct IdempotencyLayer<St = MemoryStore> {
    pub(crate) shared: Arc<Shared<St>>,
}

/// What every service of one layer shares.
#[derive(Clone)]
pub(crate) struct Shared<St> {
    pub(crate) settings: Settings,
    pub(crate) store: St,
    pub(crate) counters: Arc<Counters>,
}

impl<St> Clone for IdempotencyLayer<St> {
    fn clone(&self) -> Self {
        IdempotencyLayer {
            shared: self.shared.clone(),
        }
    }
}

impl<St: fmt::Debug> fmt::Debug for IdempotencyLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("settings", &self.shared.settings)
            .field("store", &self.shared.store)
            .finish()
    }
}

impl IdempotencyLayer<MemoryStore> {
    /// A layer for the methods named by `selectors` (as
    /// [`Selector`] parses them: `CreateProduct`,
    /// `catalog.v1.CommandService/*`, `catalog.v1.CommandService/CreateProduct`),
    /// keeping keys in a [`MemoryStore`] with its default bounds. Other
    /// methods pass through untouched.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming a selector that does not parse or is given
    /// twice, or when no selector is given (write `*` to cover every
    /// method).
    pub fn new<I>(selectors: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut methods = MethodMap::new();
        for text in selectors {
            let selector: Selector = text.as_ref().parse()?;
            methods.insert(selector, ())?;
        }
        if methods.is_empty() {
            return Err(ConfigError::value(
                "method selectors",
                "[]",
                "name at least one method (or `*` for every method)",
            ));
        }
        Ok(IdempotencyLayer {
            shared: Arc::new(Shared {
                settings: Settings {
                    methods,
                    ..Settings::default()
                },
                store: MemoryStore::new(),
                counters: Arc::default(),
            }),
        })
    }
}

impl<St: Clone> IdempotencyLayer<St> {
    fn update(mut self, f: impl FnOnce(&mut Settings)) -> Self {
        f(&mut Arc::make_mut(&mut self.shared).settings);
        self
    }

    /// Keeps keys in `store` instead (a shared [`MemoryStore`], a
    /// `RedisStore`, your own [`Store`]).
    pub fn with_store<T: Store>(self, store: T) -> IdempotencyLayer<T> {
        let Shared {
            settings, counters, ..
        } = Arc::unwrap_or_clone(self.shared);
        IdempotencyLayer {
            shared: Arc::new(Shared {
                settings,
                store,
                counters,
            }),
        }
    }

    /// Reads the key from header `name` instead of
    /// [`IDEMPOTENCY_KEY`](crate::IDEMPOTENCY_KEY) (`idempotency-key`).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when `name` is not a valid lowercase header name, or
    /// is a binary (`-bin`) or reserved (`grpc-`) gRPC header.
    pub fn with_key_header(self, name: &str) -> Result<Self, ConfigError> {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ConfigError::value("key header", name, "not a valid header name"))?;
        if header.as_str() != name {
            return Err(ConfigError::value(
                "key header",
                name,
                "header names are lowercase",
            ));
        }
        if name.ends_with("-bin") || name.starts_with("grpc-") {
            return Err(ConfigError::value(
                "key header",
                name,
                "binary (`-bin`) and reserved (`grpc-`) headers cannot carry a key",
            ));
        }
        Ok(self.update(|s| s.key_header = header))
    }

    /// Refuses calls to the named methods that carry no key, with
    /// `INVALID_ARGUMENT` naming the header. By default they pass through
    /// without deduplication.
    pub fn require_key(self) -> Self {
        self.update(|s| s.require_key = true)
    }

    /// How long a completed call's response is kept for repeats (default
    /// 24 hours). A repeat after that runs the handler again.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for zero.
    pub fn with_retention(self, retention: Duration) -> Result<Self, ConfigError> {
        nonzero("retention", retention)?;
        Ok(self.update(|s| s.retention = retention))
    }

    /// How long a claim holds a key while its handler runs (default 60 s).
    ///
    /// A claim ends when the handler's response is recorded or the key is
    /// released, so the lease matters only when the process holding it
    /// dies: then the key stays locked (repeats wait or are aborted) until
    /// the lease runs out. Set it above your longest handler: a handler
    /// still running after its lease loses the key to a repeat, which runs
    /// the handler again.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for zero.
    pub fn with_lease(self, lease: Duration) -> Result<Self, ConfigError> {
        nonzero("lease", lease)?;
        Ok(self.update(|s| s.lease = lease))
    }

    /// What a repeat gets while the first call with its key is still
    /// running (default: wait up to 5 s).
    pub fn with_in_progress(self, choice: OnInProgress) -> Self {
        self.update(|s| s.on_in_progress = choice)
    }

    /// The `grpc-retry-pushback-ms` sent with `ABORTED` to a repeat that
    /// found its key in progress (default 500 ms).
    pub fn with_pushback(self, pushback: Duration) -> Self {
        self.update(|s| s.pushback = pushback)
    }

    /// How often a waiting repeat looks at the store again; it doubles up
    /// to ten times this value (default 10 ms).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for zero.
    pub fn with_poll_interval(self, interval: Duration) -> Result<Self, ConfigError> {
        nonzero("poll interval", interval)?;
        Ok(self.update(|s| s.poll_interval = interval))
    }

    /// The largest request body read to fingerprint a keyed call (default
    /// 4 MiB, tonic's default message limit). A larger one is refused with
    /// `RESOURCE_EXHAUSTED`.
    pub fn with_max_request_bytes(self, max: usize) -> Self {
        self.update(|s| s.max_request_bytes = max)
    }

    /// The largest response body recorded (default 1 MiB); what happens to
    /// a larger one is [`IdempotencyLayer::with_oversize`]'s choice.
    pub fn with_max_response_bytes(self, max: usize) -> Self {
        self.update(|s| s.max_response_bytes = max)
    }

    /// What happens to a response too large to record (default
    /// [`OnOversize::Release`]).
    pub fn with_oversize(self, choice: OnOversize) -> Self {
        self.update(|s| s.on_oversize = choice)
    }

    /// What happens when the store fails (default
    /// [`OnStoreError::FailClosed`]).
    pub fn with_store_failure(self, choice: OnStoreError) -> Self {
        self.update(|s| s.on_store_error = choice)
    }

    /// The longest the layer waits for one store call before counting it
    /// as failed (default 1 s).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for zero.
    pub fn with_store_timeout(self, timeout: Duration) -> Result<Self, ConfigError> {
        nonzero("store timeout", timeout)?;
        Ok(self.update(|s| s.store_timeout = timeout))
    }

    /// The handler outcomes that release the key instead of being recorded,
    /// so a retry runs the handler again (default `UNAVAILABLE` and
    /// `CANCELLED`). Every other outcome, success or failure, is recorded
    /// and replayed.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if the set holds `OK`.
    pub fn with_release_on(self, codes: CodeSet) -> Result<Self, ConfigError> {
        if codes.contains(Code::Ok) {
            return Err(ConfigError::value(
                "release codes",
                codes,
                "a success is always recorded",
            ));
        }
        Ok(self.update(|s| s.release_on = codes))
    }

    /// What the layer's services did so far.
    pub fn stats(&self) -> IdempotencyStats {
        self.shared.counters.snapshot()
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.shared.store
    }
}

fn nonzero(option: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        Err(ConfigError::value(option, "0s", "must be more than zero"))
    } else {
        Ok(())
    }
}

impl<S, St> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::new(inner, self.shared.clone())
    }
}
