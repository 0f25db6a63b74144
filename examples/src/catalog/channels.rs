//! The gateway's gRPC channels: the one module that knows how they are
//! built.
//!
//! The resilient channels are `grpc-resilience`'s named channels
//! ([`ResilientChannels`]) `command` and `query`, configured from a
//! resilience config file: by default `examples/config/catalog.toml`,
//! embedded in the binary ([`CatalogConfig::built_in`]); `serve --config
//! PATH` loads another ([`CatalogConfig::from_file`]). The file's comments
//! explain each value. Each channel is the facade's stack (call telemetry,
//! deadline, retry, circuit breaker, channel), with one breaker per
//! channel in one shared registry and one retry throttle per target; under
//! it, right above the tonic channel, [`CountAttemptsLayer`] counts the
//! attempts for the GraphQL errors and the dashboard (it only observes).
//!
//! [`Stack::Plain`] builds bare tonic channels with nothing but the attempt
//! counter, for the side-by-side comparison of the demo.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use grpc_resilience::{
    BreakerSettings, ResilienceConfig, ResilientChannels, RetrySettings, State, StateChange,
    UnknownBreaker,
};
use grpc_resilience_core::BoxError;
use tokio::sync::broadcast;
use tonic::transport::{Channel, Endpoint};
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;
use tower_layer::Layer;

use super::attempts::CountAttemptsLayer;

/// The built-in resilience config (`examples/config/catalog.toml`).
pub const BUILT_IN_CONFIG: &str = include_str!("../../config/catalog.toml");

/// Where the built-in config comes from, as the reports name it.
pub const BUILT_IN_CONFIG_PATH: &str = "examples/config/catalog.toml";
/// A gRPC channel as the generated stubs take it, whatever its stack.
pub type GrpcChannel = BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    CallFailure,
>;

/// The error of a [`GrpcChannel`]: the stack's error, whole (its source
/// chain still holds the layers' typed errors and the `tonic::Status`).
///
/// A sized error type rather than a bare `BoxError`: with a boxed error the
/// compiler cannot prove the stubs' futures `Send` inside async-graphql's
/// resolvers (a higher-ranked lifetime limit).
#[derive(Debug)]
pub struct CallFailure(pub BoxError);

impl fmt::Display for CallFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for CallFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// Which stack the channels get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// Deadline, retries and circuit breakers.
    Resilient,
    /// A bare tonic channel.
    Plain,
}

impl Stack {
    /// `resilient` or `plain`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stack::Resilient => "resilient",
            Stack::Plain => "plain",
        }
    }
}

/// Where the Command and the Query service listen (`http://host:port`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Targets {
    /// The Command service.
    pub command: String,
    /// The Query service.
    pub query: String,
}

/// Why channels could not be built: the setting and what was wrong.
#[derive(Debug)]
pub struct ChannelError(String);

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ChannelError {}

/// The resilience config of the channels, with the file it came from.
#[derive(Clone, Debug)]
pub struct CatalogConfig {
    config: ResilienceConfig,
    origin: String,
}

impl CatalogConfig {
    /// The built-in config, `examples/config/catalog.toml`.
    ///
    /// # Panics
    ///
    /// Never in a released binary: the embedded file is checked by a test.
    pub fn built_in() -> Self {
        Self::from_toml(BUILT_IN_CONFIG, BUILT_IN_CONFIG_PATH)
            .unwrap_or_else(|e| panic!("the built-in {BUILT_IN_CONFIG_PATH} is invalid: {e}"))
    }

    /// Reads the config file at `path`.
    ///
    /// # Errors
    ///
    /// [`ChannelError`] naming the file, line, key and why.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ChannelError> {
        let path = path.as_ref();
        let config = ResilienceConfig::from_file(path).map_err(|e| ChannelError(e.to_string()))?;
        Self::checked(config, path.display().to_string())
    }

    /// Parses `text`, naming it `origin` in reports and errors.
    ///
    /// # Errors
    ///
    /// [`ChannelError`] naming the line, key and why.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ChannelError> {
        let config = ResilienceConfig::from_toml(text)
            .map_err(|e| ChannelError(format!("{origin}: {e}")))?;
        Self::checked(config, origin.to_owned())
    }

    fn checked(config: ResilienceConfig, origin: String) -> Result<Self, ChannelError> {
        for name in ["command", "query"] {
            if !config.channels().contains_key(name) {
                return Err(ChannelError(format!(
                    "{origin}: [channels.{name}] is missing: the gateway calls the `command` and \
                     `query` channels"
                )));
            }
        }
        config
            .validate()
            .map_err(|e| ChannelError(format!("{origin}: {e}")))?;
        Ok(CatalogConfig { config, origin })
    }

    /// The config.
    pub fn config(&self) -> &ResilienceConfig {
        &self.config
    }

    /// The file it came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

impl Default for CatalogConfig {
    fn default() -> Self {
        Self::built_in()
    }
}

/// One thing that shapes the channels' behaviour, for the demo's report.
#[derive(Clone, Debug)]
pub struct Setting {
    /// What it is.
    pub name: String,
    /// Its value.
    pub value: String,
    /// Where the value came from: the file and the key.
    pub source: String,
}

/// A breaker as the operations API shows it (from the facade's
/// `circuit_breaker_details()`).
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerStatus {
    /// `command` or `query`.
    pub name: String,
    /// Its state.
    pub state: State,
    /// Failures in the breaker's current window (the last `window`
    /// attempts in the failure-rate mode, `reset_timeout` in count mode).
    pub failure_count: u64,
    /// While open: how long until it lets probes through.
    pub next_probe_in: Option<Duration>,
}

/// The channels to the Command and the Query service.
#[derive(Clone)]
pub struct Channels {
    /// The channel to the Command service.
    pub command: GrpcChannel,
    /// The channel to the Query service.
    pub query: GrpcChannel,
    stack: Stack,
    resilient: Option<(std::sync::Arc<ResilientChannels>, CatalogConfig)>,
}

impl fmt::Debug for Channels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channels")
            .field("stack", &self.stack)
            .finish_non_exhaustive()
    }
}

fn endpoint(uri: &str) -> Result<Endpoint, ChannelError> {
    Endpoint::from_shared(uri.to_owned())
        .map_err(|e| ChannelError(format!("invalid target `{uri}`: {e}")))
}

fn plain_channel(uri: &str) -> Result<Channel, ChannelError> {
    Ok(endpoint(uri)?
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy())
}

fn boxed<S, B>(service: S) -> GrpcChannel
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .map_err(|e: S::Error| CallFailure(e.into()))
            .map_response(|r: http::Response<B>| r.map(tonic::body::Body::new))
            .service(service),
    )
}

/// Builds the channels to `targets` with `stack`; the resilient ones from
/// `config`. Install the metrics recorder before: the layers register their
/// metrics when they are made.
///
/// # Errors
///
/// [`ChannelError`] naming a bad target URI or a rejected setting.
pub fn build(
    targets: &Targets,
    stack: Stack,
    config: &CatalogConfig,
) -> Result<Channels, ChannelError> {
    match stack {
        Stack::Plain => Ok(Channels {
            command: boxed(CountAttemptsLayer.layer(plain_channel(&targets.command)?)),
            query: boxed(CountAttemptsLayer.layer(plain_channel(&targets.query)?)),
            stack,
            resilient: None,
        }),
        Stack::Resilient => {
            let origin = config.origin();
            let named = ResilientChannels::builder(config.config())
                .with_endpoint("command", endpoint(&targets.command)?)
                .with_endpoint("query", endpoint(&targets.query)?)
                .build()
                .map_err(|e| ChannelError(format!("{origin}: {e}")))?;
            // The facade's stack of each named channel (its breaker, its
            // target's throttle, its telemetry), over the same tonic channel
            // with the attempt counter under it.
            let channel = |name: &str| -> Result<GrpcChannel, ChannelError> {
                let resilient = named
                    .channel(name)
                    .map_err(|e| ChannelError(format!("{origin}: {e}")))?;
                let counted = CountAttemptsLayer.layer(resilient.get_ref().clone());
                Ok(boxed(resilient.layer().layer(counted)))
            };
            Ok(Channels {
                command: channel("command")?,
                query: channel("query")?,
                stack,
                resilient: Some((std::sync::Arc::new(named), config.clone())),
            })
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn describe_retry(s: &RetrySettings) -> String {
    let mut parts = Vec::new();
    if s.enabled() == Some(false) {
        parts.push("off".to_owned());
    }
    if let Some(v) = s.max_attempts() {
        parts.push(format!("{v} attempts"));
    }
    if let Some(v) = s.initial_delay() {
        parts.push(format!("{} initial", ms(v)));
    }
    if let Some(v) = s.max_delay() {
        parts.push(format!("{} max", ms(v)));
    }
    if let Some(v) = s.multiplier() {
        parts.push(format!("x{v}"));
    }
    if let Some(v) = s.jitter() {
        parts.push(format!("jitter {v:?}"));
    }
    if let Some(v) = s.retryable_codes() {
        parts.push(format!("retrying {v:?}"));
    }
    if s.idempotent() == Some(false) {
        parts.push("a write (not idempotent)".to_owned());
    }
    if s.idempotency_keys() == Some(true) {
        parts.push("retried with one idempotency key per call".to_owned());
    }
    if parts.is_empty() {
        "as the default".to_owned()
    } else {
        parts.join(", ")
    }
}

fn describe_breaker(s: &BreakerSettings) -> String {
    let or_default = |v: Option<String>| v.unwrap_or_else(|| "default".to_owned());
    let mut parts = Vec::new();
    match s.failure_rate() {
        Some(rate) => parts.push(format!(
            "failure-rate mode: opens at {}% failures of the last {} attempts (at least {})",
            or_default(rate.failure_rate().map(|v| v.to_string())),
            or_default(rate.window().map(|v| v.to_string())),
            or_default(rate.minimum_calls().map(|v| v.to_string())),
        )),
        None => parts.push(format!(
            "count mode: opens after {} failures within {}",
            or_default(s.failure_threshold().map(|v| v.to_string())),
            or_default(s.reset_timeout().map(ms)),
        )),
    }
    parts.push(format!("open {}", or_default(s.timeout().map(ms))));
    parts.push(format!(
        "{} probe(s) in HALF_OPEN, {} success(es) close it",
        or_default(s.half_open_max_calls().map(|v| v.to_string())),
        or_default(s.success_threshold().map(|v| v.to_string())),
    ));
    parts.join(", ")
}

fn describe_balance(
    channel: &grpc_resilience::ChannelSettings,
    b: &grpc_resilience::layers::balance::BalanceConfig,
) -> String {
    let endpoints = match (channel.endpoints(), channel.dns()) {
        (Some(list), _) => format!("{} endpoints", list.len()),
        (None, Some(dns)) => format!("the addresses of {dns}"),
        (None, None) => "the endpoints the example gives".to_owned(),
    };
    let o = b.outlier();
    let mut parts = vec![
        endpoints,
        "a breaker per endpoint".to_owned(),
        format!(
            "ejected for {} (longer in a row, at most {}), at most {}% at once",
            ms(o.base_ejection_time()),
            ms(o.max_ejection_time()),
            o.max_ejection_percent()
        ),
    ];
    if let Some(rate) = o.success_rate() {
        parts.push(format!(
            "success-rate ejection every {} below mean - {} stdev",
            ms(rate.interval()),
            rate.stdev_factor()
        ));
    }
    parts.push(match b.health() {
        Some(h) if h.service().is_empty() => "health checks of the whole server".to_owned(),
        Some(h) => format!("health checks of {}", h.service()),
        None => "no health checks".to_owned(),
    });
    parts.join(", ")
}

impl Channels {
    /// The stack these channels were built with.
    pub fn stack(&self) -> Stack {
        self.stack
    }

    /// The facade's named channels (none for plain channels).
    pub fn named(&self) -> Option<&ResilientChannels> {
        self.resilient.as_ref().map(|(named, _)| &**named)
    }

    /// Every breaker, by name (none for plain channels), from the facade's
    /// breaker snapshot.
    pub fn breakers(&self) -> Vec<BreakerStatus> {
        let Some(named) = self.named() else {
            return Vec::new();
        };
        named
            .circuit_breaker_details()
            .into_iter()
            .map(|(name, snapshot)| BreakerStatus {
                name,
                state: snapshot.state(),
                failure_count: u64::from(snapshot.failures()),
                next_probe_in: snapshot.time_to_next_probe(),
            })
            .collect()
    }

    /// Every endpoint of the balanced channels, by breaker name
    /// (`query@127.0.0.1:50052`), from the facade's `endpoint_status()`;
    /// none for single-endpoint or plain channels.
    pub fn endpoints(&self) -> Vec<grpc_resilience::EndpointDetails> {
        self.named()
            .map(|named| named.endpoint_status().into_values().collect())
            .unwrap_or_default()
    }

    /// Closes the breaker called `name`, or every breaker for `None`.
    ///
    /// # Errors
    ///
    /// [`UnknownBreaker`] if there is no such breaker (plain channels have
    /// none).
    pub fn reset(&self, name: Option<&str>) -> Result<(), UnknownBreaker> {
        match (self.named(), name) {
            (Some(named), Some(name)) => named.reset(name),
            (Some(named), None) => {
                named.reset_circuit_breakers();
                Ok(())
            }
            (None, Some(name)) => Err(UnknownBreaker(name.to_owned())),
            (None, None) => Ok(()),
        }
    }

    /// Every breaker transition from now on (`None` for plain channels).
    pub fn watch(&self) -> Option<broadcast::Receiver<StateChange>> {
        self.named().map(|named| named.registry().watch())
    }

    /// What shapes these channels' behaviour, each with the config file and
    /// key it came from.
    pub fn settings(&self) -> Vec<Setting> {
        let Some((_, config)) = &self.resilient else {
            return vec![Setting {
                name: "stack".into(),
                value: "bare tonic channel: no deadline, no retry, no breaker".into(),
                source: "examples/src/catalog/channels.rs, Stack::Plain".into(),
            }];
        };
        let origin = config.origin();
        let config = config.config();
        let at = |key: &str| format!("{origin} {key}");
        let mut settings = vec![Setting {
            name: "stack (outermost first)".into(),
            value: "call telemetry > timeout > retry > circuit breaker > channel".into(),
            source: "grpc-resilience's ResilientChannels (DESIGN.md's order)".into(),
        }];
        let timeouts = config.timeouts();
        let mut value = match timeouts.default_timeout() {
            Some(d) => format!("default {}", ms(d)),
            None => "no default".to_owned(),
        };
        for (selector, timeout) in timeouts.operations() {
            let t = timeout.map_or_else(|| "none".to_owned(), ms);
            value.push_str(&format!(", {selector} {t}"));
        }
        if let Some(d) = timeouts.per_attempt() {
            value.push_str(&format!(", per attempt {}", ms(d)));
        }
        settings.push(Setting {
            name: "timeouts".into(),
            value,
            source: at("[timeouts]"),
        });
        if let Some(default) = config.retry().default_settings() {
            settings.push(Setting {
                name: "retry".into(),
                value: describe_retry(default),
                source: at("[retry.default]"),
            });
        }
        for (selector, s) in config.retry().operations() {
            settings.push(Setting {
                name: format!("retry of {selector}"),
                value: describe_retry(s),
                source: at(&format!("[retry.operations.{selector}]")),
            });
        }
        settings.push(Setting {
            name: "retry throttle".into(),
            value: match config.retry().throttle() {
                Some(t) => format!(
                    "token bucket per target: {} tokens, ratio {} (retries stop while it is at half or less)",
                    t.max_tokens(),
                    t.token_ratio()
                ),
                None => "none".into(),
            },
            source: at("[retry.throttle]"),
        });
        let channels: BTreeMap<_, _> = config.channels().iter().collect();
        for (name, channel) in channels {
            let breaker = channel.breaker().unwrap_or(name);
            let value = config.breakers().get(breaker).map_or_else(
                || "the breaker crate's defaults".to_owned(),
                describe_breaker,
            );
            settings.push(Setting {
                name: format!("circuit breaker `{breaker}` (channel `{name}`)"),
                value,
                source: at(&format!("[circuit_breakers.{breaker}]")),
            });
            if channel.is_balanced()
                && let Ok(balance) = channel.to_balance_config(name)
            {
                settings.push(Setting {
                    name: format!("balanced channel `{name}`"),
                    value: describe_balance(channel, &balance),
                    source: at(&format!("[channels.{name}]")),
                });
            }
        }
        settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets() -> Targets {
        Targets {
            command: "http://127.0.0.1:1".into(),
            query: "http://127.0.0.1:2".into(),
        }
    }

    #[test]
    fn the_built_in_config_holds_the_tuned_values() {
        let config = CatalogConfig::built_in();
        assert_eq!(config.origin(), BUILT_IN_CONFIG_PATH);
        let c = config.config();
        let timeouts = c.timeout_policy().unwrap();
        let t = |path| timeouts.timeout_for(path);
        assert_eq!(
            t("/catalog.v1.QueryService/GetProduct"),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            t("/catalog.v1.QueryService/ListProducts"),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            t("/catalog.v1.CommandService/ImportProducts"),
            Some(Duration::from_secs(5))
        );
        let throttle = c.retry().throttle().unwrap();
        assert_eq!((throttle.max_tokens(), throttle.token_ratio()), (20.0, 1.0));
        for name in ["command", "query"] {
            let b = &c.breakers()[name];
            let rate = b.failure_rate().expect("failure-rate mode");
            assert_eq!(
                (rate.window(), rate.minimum_calls(), rate.failure_rate()),
                (Some(100), Some(40), Some(80.0))
            );
            assert_eq!(b.timeout(), Some(Duration::from_secs(1)));
            assert_eq!(
                (b.half_open_max_calls(), b.success_threshold()),
                (Some(1), Some(1))
            );
            b.to_breaker_config().validate().unwrap();
        }
        let retries = c.retry_policies().unwrap();
        let create = retries
            .policy_for("/catalog.v1.CommandService/CreateProduct")
            .unwrap();
        assert_eq!(
            create,
            &grpc_resilience::RetryPolicy::default()
                .non_idempotent()
                .with_idempotency_keys()
        );
    }

    #[tokio::test]
    async fn breakers_are_the_named_channels_and_reset_closes_them() {
        let channels = build(&targets(), Stack::Resilient, &CatalogConfig::built_in()).unwrap();
        let names: Vec<String> = channels.breakers().into_iter().map(|b| b.name).collect();
        assert_eq!(names, ["command", "query"]);
        assert!(channels.breakers().iter().all(|b| b.state == State::Closed
            && b.failure_count == 0
            && b.next_probe_in.is_none()));
        channels.named().unwrap().force_open("query").unwrap();
        let state = |name: &str| {
            let found = channels.breakers().into_iter().find(|b| b.name == name);
            found.map(|b| b.state)
        };
        assert_eq!(state("query"), Some(State::ForcedOpen));
        assert_eq!(state("command"), Some(State::Closed));
        channels.reset(Some("query")).unwrap();
        assert!(channels.breakers().iter().all(|b| b.state == State::Closed));
        assert!(channels.reset(Some("nope")).is_err());

        let plain = build(&targets(), Stack::Plain, &CatalogConfig::built_in()).unwrap();
        assert!(plain.breakers().is_empty());
        assert!(plain.watch().is_none());
        assert_eq!(
            plain.reset(Some("query")),
            Err(UnknownBreaker("query".into()))
        );

        let err = build(
            &Targets {
                command: "not a uri".into(),
                query: targets().query,
            },
            Stack::Resilient,
            &CatalogConfig::built_in(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("`not a uri`"), "{err}");
    }

    #[tokio::test]
    async fn every_setting_names_its_file_and_key() {
        let channels = build(&targets(), Stack::Resilient, &CatalogConfig::built_in());
        let settings = channels.unwrap().settings();
        let throttle = settings
            .iter()
            .find(|s| s.name == "retry throttle")
            .unwrap();
        assert_eq!(
            throttle.source,
            "examples/config/catalog.toml [retry.throttle]"
        );
        assert!(
            throttle.value.contains("20 tokens, ratio 1"),
            "{throttle:?}"
        );
        let query = settings
            .iter()
            .find(|s| s.source.ends_with("[circuit_breakers.query]"))
            .unwrap();
        assert!(
            query
                .value
                .contains("80% failures of the last 100 attempts (at least 40)"),
            "{query:?}"
        );
        assert!(query.value.contains("open 1000 ms"), "{query:?}");
        assert!(
            settings.iter().any(
                |s| s.source.ends_with("[timeouts]") && s.value.contains("get_product 3000 ms")
            )
        );
    }

    #[tokio::test]
    async fn a_balanced_channel_is_described_with_its_key() {
        let text = format!(
            "{BUILT_IN_CONFIG}\n[channels.query.outlier]\nmax_ejection_percent = 50\n\
             [channels.query.health]\nservice = \"catalog.v1.QueryService\"\n"
        );
        let config = CatalogConfig::from_toml(&text, "mine.toml").unwrap();
        let channels = build(&targets(), Stack::Resilient, &config).unwrap();
        let settings = channels.settings();
        let balanced: Vec<&Setting> = settings
            .iter()
            .filter(|s| s.name.starts_with("balanced channel"))
            .collect();
        assert_eq!(balanced.len(), 1, "{settings:?}");
        assert_eq!(balanced[0].name, "balanced channel `query`");
        assert_eq!(balanced[0].source, "mine.toml [channels.query]");
        assert_eq!(
            balanced[0].value,
            "the endpoints the example gives, a breaker per endpoint, ejected for 30000 ms \
             (longer in a row, at most 300000 ms), at most 50% at once, health checks of \
             catalog.v1.QueryService"
        );
        let names: Vec<String> = channels.breakers().into_iter().map(|b| b.name).collect();
        assert_eq!(names, ["command", "query", "query@127.0.0.1:2"]);
        // The built-in config has none.
        let plain = build(&targets(), Stack::Resilient, &CatalogConfig::built_in()).unwrap();
        assert!(
            !plain
                .settings()
                .iter()
                .any(|s| s.name.starts_with("balanced"))
        );
    }

    #[test]
    fn a_config_without_the_gateways_channels_is_refused_with_its_origin() {
        let err = CatalogConfig::from_toml(
            "[channels.query]\nservices = [\"catalog.v1.QueryService\"]\n",
            "mine.toml",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("mine.toml: [channels.command] is missing"),
            "{err}"
        );
        let err = CatalogConfig::from_toml("[retry.default]\nmax_attempts = 0\n", "mine.toml")
            .unwrap_err();
        assert!(err.to_string().starts_with("mine.toml"), "{err}");
        assert!(err.to_string().contains("max_attempts"), "{err}");
    }
}
