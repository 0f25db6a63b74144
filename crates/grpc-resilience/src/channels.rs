//! Named channels: the connection set of a config's `[channels]`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use grpc_balance::{BalancedChannel, BuildError, EndpointDetails};
use grpc_circuit_breaker::{BreakerRegistry, BreakerSnapshot, State, UnknownBreaker};
use grpc_retry::{RetryBudget, RetryThrottle};
use tonic::transport::{Channel, Endpoint};

use crate::config::ChannelSettings;
use crate::error::key_path;
use crate::named::NamedChannel;
use crate::stack::{BreakerChoice, Limiters, StackShared, configure_breakers};
use crate::{ConfigError, ReloadReport, ResilienceConfig, ResilientChannel};

/// One resilient channel per `[channels.<name>]` entry, sharing one
/// breaker registry, with one retry throttle, retry budget and bulkhead per
/// target: channels to the same endpoint share its bucket, its budget and
/// its concurrency partitions, so two channels to one backend cannot each
/// send it a full `max_concurrent`.
///
/// A channel with one `endpoint` sits on a tonic `Channel`; one with
/// `endpoints` or `dns` on a [`BalancedChannel`] with a breaker per
/// endpoint, outlier ejection and health checks (see the
/// [config docs](crate::config#balanced-channels)), whose endpoints
/// [`ResilientChannels::endpoint_status`] reports.
///
/// Each channel has its own breaker, named after the channel unless its
/// entry names another (`breaker = "query"`): two channels to different
/// backends that serve the same gRPC service never share a breaker, so one
/// failing backend does not cut the other off.
///
/// ```
/// use catalog_proto::command_service_client::CommandServiceClient;
/// use catalog_proto::query_service_client::QueryServiceClient;
/// use grpc_resilience::{ResilienceConfig, ResilientChannels};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = ResilienceConfig::from_toml(r#"
///     [circuit_breakers.query]
///     failure_threshold = 5
///     [channels.query]
///     endpoint = "http://127.0.0.1:50052"
///     services = ["catalog.v1.QueryService"]
///     [channels.command]
///     services = ["catalog.v1.CommandService"]
/// "#)?;
/// let channels = ResilientChannels::builder(&config)
///     .with_endpoint("command", tonic::transport::Endpoint::from_static("http://127.0.0.1:50051"))
///     .build()?;
/// let queries = QueryServiceClient::new(channels.channel("query")?);
/// let commands = CommandServiceClient::new(channels.for_service("catalog.v1.CommandService")?);
/// # drop((queries, commands));
///
/// // The design's get_circuit_breaker_status(), every breaker from the start:
/// assert_eq!(format!("{:?}", channels.circuit_breaker_status()), r#"{"command": Closed, "query": Closed}"#);
/// channels.reset_circuit_breakers();
/// # Ok(())
/// # }
/// ```
pub struct ResilientChannels {
    channels: BTreeMap<String, ResilientChannel<NamedChannel>>,
    targets: BTreeMap<String, String>,
    limiters: Mutex<BTreeMap<String, Limiters>>,
    services: BTreeMap<String, String>,
    registry: BreakerRegistry,
    reloading: Mutex<()>,
}

impl fmt::Debug for ResilientChannels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResilientChannels")
            .field("channels", &self.channels.keys().collect::<Vec<_>>())
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

/// Builds [`ResilientChannels`]: endpoints from the file or given here.
#[derive(Debug)]
pub struct ResilientChannelsBuilder<'c> {
    config: &'c ResilienceConfig,
    /// Endpoints given in code, and whether `with_endpoints` gave them.
    endpoints: BTreeMap<String, (Vec<Endpoint>, bool)>,
    channels: BTreeMap<String, Channel>,
    registry: Option<BreakerRegistry>,
}

impl ResilientChannelsBuilder<'_> {
    /// Connects channel `name` to `endpoint`, instead of (or for want of)
    /// the file's `endpoint`, `endpoints` or `dns`; the file's connect
    /// options still apply. A balanced channel in the file (one with
    /// `endpoints`, `dns`, or an `outlier`, `health` or `endpoint_breaker`
    /// table) stays balanced, over this one endpoint.
    pub fn with_endpoint(mut self, name: impl Into<String>, endpoint: Endpoint) -> Self {
        self.endpoints.insert(name.into(), (vec![endpoint], false));
        self
    }

    /// Makes channel `name` a balanced channel over `endpoints`, instead
    /// of the file's endpoints, with the entry's outlier, health and
    /// endpoint breaker settings; the file's connect options still apply.
    pub fn with_endpoints(
        mut self,
        name: impl Into<String>,
        endpoints: impl IntoIterator<Item = Endpoint>,
    ) -> Self {
        self.endpoints
            .insert(name.into(), (endpoints.into_iter().collect(), true));
        self
    }

    /// Uses an already made tonic channel for `name`.
    pub fn with_channel(mut self, name: impl Into<String>, channel: Channel) -> Self {
        self.channels.insert(name.into(), channel);
        self
    }

    /// Keeps the breakers in `registry` (default: a new one).
    pub fn with_registry(mut self, registry: BreakerRegistry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Makes every channel (connecting lazily, on first use) and every
    /// breaker.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if the config is invalid, a channel has no endpoint,
    /// or a channel given in code is not in the config.
    pub fn build(self) -> Result<ResilientChannels, ConfigError> {
        let compiled = self.config.compile()?;
        for name in self.endpoints.keys().chain(self.channels.keys()) {
            if !self.config.channels().contains_key(name) {
                return Err(ConfigError::new(
                    key_path(["channels", name.as_str()]),
                    None,
                    "given in code but there is no such [channels] entry",
                ));
            }
        }
        let registry = self.registry.unwrap_or_default();
        configure_breakers(&registry, &compiled.breakers);
        let mut channels = BTreeMap::new();
        let mut targets = BTreeMap::new();
        let mut limiters: BTreeMap<String, Limiters> = BTreeMap::new();
        let mut services = BTreeMap::new();
        for (name, settings) in self.config.channels() {
            let (channel, target, uri) = if let Some(channel) = self.channels.get(name) {
                (
                    NamedChannel::Single(channel.clone()),
                    format!("channel:{name}"),
                    None,
                )
            } else {
                connect(name, settings, self.endpoints.get(name), &registry)?
            };
            let target_limiters = match limiters.get(&target) {
                Some(l) => l.clone(),
                None => {
                    let l = Limiters::for_config(None, &compiled)?;
                    limiters.insert(target.clone(), l.clone());
                    l
                }
            };
            let mut shared = StackShared::new(
                self.config,
                &compiled,
                registry.clone(),
                BreakerChoice::Channel(name.clone()),
                target_limiters,
            );
            if let Some(uri) = &uri {
                shared = shared.with_server(uri);
            }
            for service in settings.services() {
                services
                    .entry(service.clone())
                    .or_insert_with(|| name.clone());
            }
            channels.insert(
                name.clone(),
                ResilientChannel::from_parts(channel, Arc::new(shared)),
            );
            targets.insert(name.clone(), target);
        }
        Ok(ResilientChannels {
            channels,
            targets,
            limiters: Mutex::new(limiters),
            services,
            registry,
            reloading: Mutex::new(()),
        })
    }
}

/// Makes channel `name`'s service and names its target (channels to the
/// same target share a retry throttle, budget and bulkhead), with the
/// server's URI for the call span when there is one server.
fn connect(
    name: &str,
    settings: &ChannelSettings,
    given: Option<&(Vec<Endpoint>, bool)>,
    registry: &BreakerRegistry,
) -> Result<(NamedChannel, String, Option<http::Uri>), ConfigError> {
    let parse = |uri: &str, key: &str| {
        Endpoint::from_shared(uri.to_owned()).map_err(|e| {
            ConfigError::new(
                key_path(["channels", name, key]),
                Some(format!("{uri:?}")),
                format!("not a valid URI: {e}"),
            )
        })
    };
    let balanced = settings.is_balanced() || given.is_some_and(|(_, many)| *many);
    if !balanced {
        let endpoint = match (
            given.and_then(|(list, _)| list.first()),
            settings.endpoint(),
        ) {
            (Some(e), _) => e.clone(),
            (None, Some(uri)) => parse(uri, "endpoint")?,
            (None, None) => {
                return Err(ConfigError::new(
                    key_path(["channels", name, "endpoint"]),
                    None,
                    "no endpoint: set it in the file or with `with_endpoint`",
                ));
            }
        };
        let target = endpoint.uri().to_string();
        let uri = endpoint.uri().clone();
        let channel = settings.configure_endpoint(endpoint).connect_lazy();
        return Ok((NamedChannel::Single(channel), target, Some(uri)));
    }
    let config = settings.to_balance_config(name)?;
    let built = |r: Result<BalancedChannel, BuildError>| {
        r.map_err(|e| {
            let reason = match e {
                BuildError::NoRuntime => {
                    "a balanced channel must be built inside a tokio runtime".to_owned()
                }
                other => other.to_string(),
            };
            ConfigError::new(key_path(["channels", name]), None, reason)
        })
    };
    let endpoints: Vec<Endpoint> = match (given, settings.endpoints(), settings.dns()) {
        (Some((list, _)), _, _) => list.clone(),
        (None, Some(uris), _) => uris
            .iter()
            .map(|uri| parse(uri, "endpoints"))
            .collect::<Result<_, _>>()?,
        (None, None, Some(host_port)) => {
            let connect = settings.clone();
            let channel = built(BalancedChannel::from_dns_with(
                config,
                registry.clone(),
                host_port,
                move |endpoint| connect.configure_endpoint(endpoint),
            ))?;
            return Ok((
                NamedChannel::Balanced(channel),
                format!("dns:{host_port}"),
                None,
            ));
        }
        (None, None, None) => {
            return Err(ConfigError::new(
                key_path(["channels", name, "endpoints"]),
                None,
                "no endpoints: list them (`endpoints = [...]`), give `dns`, \
                 or use `with_endpoints`",
            ));
        }
    };
    if endpoints.is_empty() {
        return Err(ConfigError::new(
            key_path(["channels", name, "endpoints"]),
            None,
            "`with_endpoints` was given no endpoint",
        ));
    }
    let target = endpoints
        .iter()
        .map(|e| e.uri().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let endpoints: Vec<Endpoint> = endpoints
        .into_iter()
        .map(|e| settings.configure_endpoint(e))
        .collect();
    let channel = built(BalancedChannel::from_endpoints(
        config,
        registry.clone(),
        endpoints,
    ))?;
    Ok((
        NamedChannel::Balanced(channel),
        format!("endpoints:{target}"),
        None,
    ))
}

/// No channel of that name or for that service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownChannel(String);

impl fmt::Display for UnknownChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UnknownChannel {}

impl ResilientChannels {
    /// Starts building the channels of `config`'s `[channels]`.
    pub fn builder(config: &ResilienceConfig) -> ResilientChannelsBuilder<'_> {
        ResilientChannelsBuilder {
            config,
            endpoints: BTreeMap::new(),
            channels: BTreeMap::new(),
            registry: None,
        }
    }

    /// The channels of `config`, every endpoint from the file.
    ///
    /// # Errors
    ///
    /// As [`ResilientChannelsBuilder::build`].
    pub fn from_config(config: &ResilienceConfig) -> Result<Self, ConfigError> {
        Self::builder(config).build()
    }

    /// The channel called `name` (a clone: cheap, and sharing everything).
    ///
    /// # Errors
    ///
    /// [`UnknownChannel`] if there is none.
    pub fn channel(&self, name: &str) -> Result<ResilientChannel<NamedChannel>, UnknownChannel> {
        self.channels.get(name).cloned().ok_or_else(|| {
            UnknownChannel(format!(
                "no channel is named `{name}` (there are: {})",
                self.names().join(", ")
            ))
        })
    }

    /// The channel whose `services` list `service` (fully qualified, e.g.
    /// `catalog.v1.QueryService`); the first by name if several do.
    ///
    /// # Errors
    ///
    /// [`UnknownChannel`] if none does.
    pub fn for_service(
        &self,
        service: &str,
    ) -> Result<ResilientChannel<NamedChannel>, UnknownChannel> {
        match self.services.get(service) {
            Some(name) => self.channel(name),
            None => Err(UnknownChannel(format!(
                "no channel lists the service `{service}`"
            ))),
        }
    }

    /// The channels' names.
    pub fn names(&self) -> Vec<String> {
        self.channels.keys().cloned().collect()
    }

    /// The breaker registry all channels share.
    pub fn registry(&self) -> &BreakerRegistry {
        &self.registry
    }

    /// The retry throttle of channel `name`'s target, if the config has one.
    pub fn throttle(&self, name: &str) -> Option<RetryThrottle> {
        let target = self.targets.get(name)?;
        lock(&self.limiters).get(target)?.throttle.clone()
    }

    /// The retry budget of channel `name`'s target, if the config has one.
    pub fn budget(&self, name: &str) -> Option<RetryBudget> {
        let target = self.targets.get(name)?;
        lock(&self.limiters).get(target)?.budget.clone()
    }

    /// Every breaker's state by name, every configured breaker listed from
    /// the start (the design's `get_circuit_breaker_status()`); a balanced
    /// channel's endpoint breakers are listed as `<channel>@<host:port>`
    /// (e.g. `query@127.0.0.1:50052`).
    pub fn circuit_breaker_status(&self) -> BTreeMap<String, State> {
        self.registry.status()
    }

    /// Every breaker with its state, failure count and time to the next
    /// probe, every configured breaker listed from the start: what an
    /// operator's status page shows.
    pub fn circuit_breaker_details(&self) -> BTreeMap<String, BreakerSnapshot> {
        self.registry.snapshot()
    }

    /// Every endpoint of the balanced channels, by its breaker's name
    /// (`query@127.0.0.1:50052`): in the ready set, ejected (and why) or
    /// probing, its breaker's state, how often it was ejected, whether its
    /// health watch says it is not serving. Single-endpoint channels have
    /// none.
    ///
    /// ```
    /// use grpc_resilience::{EndpointStatus, ResilienceConfig, ResilientChannels, State};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = ResilienceConfig::from_toml(r#"
    ///     [channels.query]
    ///     endpoints = ["http://127.0.0.1:50061", "http://127.0.0.1:50062"]
    ///     [channels.query.outlier]
    ///     max_ejection_percent = 50
    ///     [channels.command]
    ///     endpoint = "http://127.0.0.1:50051"
    /// "#)?;
    /// let channels = ResilientChannels::from_config(&config)?;
    /// let endpoints = channels.endpoint_status();
    /// let names: Vec<&str> = endpoints.keys().map(String::as_str).collect();
    /// assert_eq!(names, ["query@127.0.0.1:50061", "query@127.0.0.1:50062"]);
    /// let first = &endpoints["query@127.0.0.1:50061"];
    /// assert_eq!(first.status, EndpointStatus::Active);
    /// assert_eq!((first.breaker_state, first.ejections), (Some(State::Closed), 0));
    ///
    /// // The endpoint breakers are in the registry, beside the channels'.
    /// assert_eq!(
    ///     format!("{:?}", channels.circuit_breaker_status()),
    ///     r#"{"command": Closed, "query": Closed, "query@127.0.0.1:50061": Closed, "query@127.0.0.1:50062": Closed}"#
    /// );
    /// # Ok(())
    /// # }
    /// ```
    pub fn endpoint_status(&self) -> BTreeMap<String, EndpointDetails> {
        self.channels
            .values()
            .filter_map(|c| c.get_ref().balanced())
            .flat_map(|b| b.endpoint_details().into_values())
            .map(|d| (d.breaker.clone(), d))
            .collect()
    }

    /// The balanced channel under channel `name`, if it is one.
    pub fn balanced(&self, name: &str) -> Option<&BalancedChannel> {
        self.channels.get(name)?.get_ref().balanced()
    }

    /// Closes every breaker (the design's `reset_circuit_breakers()`).
    pub fn reset_circuit_breakers(&self) {
        self.registry.reset_all();
    }

    /// Closes the breaker called `name`.
    ///
    /// # Errors
    ///
    /// [`UnknownBreaker`] if there is none.
    pub fn reset(&self, name: &str) -> Result<(), UnknownBreaker> {
        self.registry.reset(name)
    }

    /// Holds the breaker called `name` open until it is reset.
    ///
    /// # Errors
    ///
    /// [`UnknownBreaker`] if there is none.
    pub fn force_open(&self, name: &str) -> Result<(), UnknownBreaker> {
        self.registry.force_open(name)
    }

    /// Switches the breaker called `name` off until it is reset.
    ///
    /// # Errors
    ///
    /// [`UnknownBreaker`] if there is none.
    pub fn disable(&self, name: &str) -> Result<(), UnknownBreaker> {
        self.registry.disable(name)
    }

    /// Reads the config file at `path` and applies it as
    /// [`ResilientChannels::reload`] does.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the file, line, key and why; the old config
    /// stays.
    pub fn reload_file(
        &self,
        path: impl AsRef<std::path::Path>,
    ) -> Result<ReloadReport, ConfigError> {
        let current = self
            .channels
            .values()
            .next()
            .map(|c| c.config())
            .unwrap_or_default();
        crate::reload::reload_file(&current, path.as_ref(), |c| self.reload(c))
    }

    /// Reloads the config file at `path` whenever it changes; see
    /// [`ConfigWatcher`](crate::ConfigWatcher).
    #[cfg(feature = "watch")]
    pub fn watch_file(
        self: &Arc<Self>,
        path: impl Into<std::path::PathBuf>,
        interval: std::time::Duration,
    ) -> crate::ConfigWatcher {
        let channels = self.clone();
        crate::ConfigWatcher::spawn(path, interval, move |p| channels.reload_file(p))
    }

    /// Applies `config` to new calls of every channel; see
    /// [`ResilientChannel::reload`]. The set of channels and their
    /// endpoints cannot change this way.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if the config is invalid or changes the channels;
    /// nothing is applied then.
    pub fn reload(&self, config: &ResilienceConfig) -> Result<ReloadReport, ConfigError> {
        let _one_at_a_time = lock(&self.reloading);
        let compiled = config.compile()?;
        let old = self
            .channels
            .values()
            .next()
            .map(|c| c.config())
            .unwrap_or_default();
        for (name, settings) in config.channels() {
            let reason = match old.channels().get(name) {
                Some(before) if before.same_connection(settings) => continue,
                Some(before) if before.same_endpoints(settings) => {
                    "a balanced channel's outlier, health and endpoint breaker settings \
                     cannot change by a reload; restart to change them"
                }
                _ => "channels cannot be added or re-pointed by a reload; restart to change them",
            };
            return Err(ConfigError::new(
                key_path(["channels", name.as_str()]),
                None,
                reason,
            ));
        }
        if let Some(name) = old
            .channels()
            .keys()
            .find(|n| !config.channels().contains_key(*n))
        {
            return Err(ConfigError::new(
                key_path(["channels", name.as_str()]),
                None,
                "channels cannot be removed by a reload; restart to change them",
            ));
        }
        // New throttles and budgets per target, keeping those whose
        // settings stay.
        let mut limiters = lock(&self.limiters);
        let mut fresh: BTreeMap<String, Limiters> = BTreeMap::new();
        for target in self.targets.values() {
            if fresh.contains_key(target) {
                continue;
            }
            let l = Limiters::for_config(limiters.get(target), &compiled)?;
            fresh.insert(target.clone(), l);
        }
        let mut generation = 0;
        for (name, channel) in &self.channels {
            let l = fresh.get(&self.targets[name]).cloned().unwrap_or_default();
            generation = channel.shared().swap(config, &compiled, l);
        }
        *limiters = fresh;
        Ok(ReloadReport::new(
            generation,
            configure_breakers(&self.registry, &compiled.breakers),
        ))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
