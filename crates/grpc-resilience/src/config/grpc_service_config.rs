//! Import of a gRPC service config (JSON), as grpc-go, grpc-java and
//! grpc-core read it.

use std::fmt;
use std::time::Duration;

use grpc_resilience_core::CodeSet;
use grpc_resilience_core::codes::parse_code;
use grpc_retry::Jitter;
use serde_json::{Map, Value};

use super::serde_helpers::code_from_number;
use super::{HedgingSettings, ResilienceConfig, RetrySettings, ThrottleSettings};
use crate::error::ConfigError;

/// Something in a gRPC service config that was not imported, with where it
/// was: the import never drops a setting silently.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportWarning {
    path: String,
    message: String,
}

impl ImportWarning {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ImportWarning {
            path: path.into(),
            message: message.into(),
        }
    }

    /// The JSON path of the setting, e.g. `methodConfig[0].hedgingPolicy`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What was done with it.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ImportWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The JSON key, compared as grpc-go does (first letter in either case).
fn key_is(key: &str, wanted: &str) -> bool {
    key.len() == wanted.len()
        && key[..1].eq_ignore_ascii_case(&wanted[..1])
        && key[1..] == wanted[1..]
}

fn err(path: &str, value: &Value, reason: impl Into<String>) -> ConfigError {
    ConfigError::new(path, Some(value.to_string()), reason)
}

/// A protobuf JSON duration: decimal seconds with an `s` suffix, `"0.1s"`.
fn proto_duration(path: &str, value: &Value) -> Result<Duration, ConfigError> {
    let text = value
        .as_str()
        .ok_or_else(|| err(path, value, "a duration is a string such as \"0.1s\""))?;
    let seconds = text
        .strip_suffix('s')
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .ok_or_else(|| {
            err(
                path,
                value,
                "a duration is decimal seconds ending in `s`, such as \"0.1s\"",
            )
        })?;
    Duration::try_from_secs_f64(seconds).map_err(|e| err(path, value, e.to_string()))
}

fn codes(path: &str, value: &Value) -> Result<CodeSet, ConfigError> {
    let items = value
        .as_array()
        .ok_or_else(|| err(path, value, "a list of status codes"))?;
    let mut set = CodeSet::EMPTY;
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        let code = match item {
            Value::String(name) => {
                parse_code(name).map_err(|e| err(&item_path, item, e.to_string()))?
            }
            Value::Number(n) => n
                .as_i64()
                .and_then(code_from_number)
                .ok_or_else(|| err(&item_path, item, "not a gRPC status code number (0 to 16)"))?,
            _ => return Err(err(&item_path, item, "a status code name or number")),
        };
        set = set.with(code);
    }
    Ok(set)
}

fn selector(path: &str, name: &Value) -> Result<String, ConfigError> {
    let obj = name.as_object().ok_or_else(|| {
        err(
            path,
            name,
            "a name is an object with `service` and `method`",
        )
    })?;
    let mut service = None;
    let mut method = None;
    for (k, v) in obj {
        let text = v
            .as_str()
            .ok_or_else(|| err(&format!("{path}.{k}"), v, "a string"))?;
        if key_is(k, "service") {
            service = Some(text);
        } else if key_is(k, "method") {
            method = Some(text);
        } else {
            return Err(err(
                &format!("{path}.{k}"),
                v,
                "a name has only `service` and `method`",
            ));
        }
    }
    match (service.unwrap_or(""), method.unwrap_or("")) {
        ("", "") => Ok("*".into()),
        ("", _) => Err(err(
            path,
            name,
            "a name with a method must name its service",
        )),
        (s, "") => Ok(format!("{s}/*")),
        (s, m) => Ok(format!("{s}/{m}")),
    }
}

fn retry_policy(
    path: &str,
    value: &Value,
    warnings: &mut Vec<ImportWarning>,
) -> Result<RetrySettings, ConfigError> {
    let obj = value
        .as_object()
        .ok_or_else(|| err(path, value, "retryPolicy is an object"))?;
    // gRFC A6: backoff is random(0, current_backoff): full jitter.
    let mut settings = RetrySettings::new().with_jitter(Jitter::Full);
    let mut seen = [false; 5];
    for (k, v) in obj {
        let p = format!("{path}.{k}");
        if key_is(k, "maxAttempts") {
            let n = v
                .as_u64()
                .ok_or_else(|| err(&p, v, "an integer of at least 2"))?;
            if n < 2 {
                return Err(err(&p, v, "must be at least 2 (gRFC A6)"));
            }
            let n = if n > 5 {
                warnings.push(ImportWarning::new(
                    &p,
                    format!("{n} is treated as 5, as gRPC does (gRFC A6)"),
                ));
                5
            } else {
                n
            };
            settings = settings.with_max_attempts(n as u32);
            seen[0] = true;
        } else if key_is(k, "initialBackoff") {
            settings = settings.with_initial_delay(proto_duration(&p, v)?);
            seen[1] = true;
        } else if key_is(k, "maxBackoff") {
            settings = settings.with_max_delay(proto_duration(&p, v)?);
            seen[2] = true;
        } else if key_is(k, "backoffMultiplier") {
            let m = v.as_f64().ok_or_else(|| err(&p, v, "a number above 0"))?;
            settings = settings.with_multiplier(m);
            seen[3] = true;
        } else if key_is(k, "retryableStatusCodes") {
            settings = settings.with_retryable_codes(codes(&p, v)?);
            seen[4] = true;
        } else {
            warnings.push(ImportWarning::new(p, "not supported; ignored"));
        }
    }
    let names = [
        "maxAttempts",
        "initialBackoff",
        "maxBackoff",
        "backoffMultiplier",
        "retryableStatusCodes",
    ];
    for (i, name) in names.iter().enumerate() {
        if !seen[i] {
            return Err(err(path, value, format!("`{name}` is required (gRFC A6)")));
        }
    }
    Ok(settings)
}

fn hedging_policy(
    path: &str,
    value: &Value,
    warnings: &mut Vec<ImportWarning>,
) -> Result<HedgingSettings, ConfigError> {
    let obj = value
        .as_object()
        .ok_or_else(|| err(path, value, "hedgingPolicy is an object"))?;
    // gRFC A6: hedgingDelay defaults to 0s (all at once), nonFatalStatusCodes
    // to none; maxAttempts is required.
    let mut settings = HedgingSettings::new()
        .with_hedging_delay(Duration::ZERO)
        .with_non_fatal_codes(CodeSet::EMPTY);
    let mut max_attempts = false;
    for (k, v) in obj {
        let p = format!("{path}.{k}");
        if key_is(k, "maxAttempts") {
            let n = v
                .as_u64()
                .ok_or_else(|| err(&p, v, "an integer of at least 2"))?;
            if n < 2 {
                return Err(err(&p, v, "must be at least 2 (gRFC A6)"));
            }
            let n = if n > 5 {
                warnings.push(ImportWarning::new(
                    &p,
                    format!("{n} is treated as 5, as gRPC does (gRFC A6)"),
                ));
                5
            } else {
                n
            };
            settings = settings.with_max_attempts(n as u32);
            max_attempts = true;
        } else if key_is(k, "hedgingDelay") {
            settings = settings.with_hedging_delay(proto_duration(&p, v)?);
        } else if key_is(k, "nonFatalStatusCodes") {
            settings = settings.with_non_fatal_codes(codes(&p, v)?);
        } else {
            warnings.push(ImportWarning::new(p, "not supported; ignored"));
        }
    }
    if !max_attempts {
        return Err(err(path, value, "`maxAttempts` is required (gRFC A6)"));
    }
    Ok(settings)
}

impl ResilienceConfig {
    /// Imports a gRPC service config (JSON), so a team moving from
    /// grpc-go or grpc-java keeps its file: each `methodConfig` entry's
    /// `timeout` becomes a `[timeouts.operations]` entry and its
    /// `retryPolicy` a `[retry.operations]` entry (with gRPC's full jitter)
    /// and its `hedgingPolicy` a `[hedging.operations]` entry, for every
    /// `name` it lists (`{}` or `{"service": ""}` is the default);
    /// `retryThrottling` becomes `[retry.throttle]`. An entry with both a
    /// `retryPolicy` and a `hedgingPolicy` is an error, as in gRPC.
    ///
    /// Everything else (`waitForReady`,
    /// `maxRequestMessageBytes`, `loadBalancingConfig`, ...) is returned as
    /// warnings, never dropped silently; so is a `maxAttempts` above 5,
    /// which gRPC caps at 5.
    ///
    /// ```
    /// use grpc_resilience::ResilienceConfig;
    ///
    /// let (config, warnings) = ResilienceConfig::from_grpc_service_config(r#"{
    ///   "methodConfig": [{
    ///     "name": [{"service": "catalog.v1.QueryService"}],
    ///     "timeout": "1.5s",
    ///     "waitForReady": true,
    ///     "retryPolicy": {
    ///       "maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s",
    ///       "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]
    ///     }
    ///   }],
    ///   "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}
    /// }"#)?;
    /// assert_eq!(warnings[0].to_string(), "methodConfig[0].waitForReady: not supported; ignored");
    /// assert_eq!(
    ///     config.retry_policies()?.policy_for("/catalog.v1.QueryService/GetProduct").is_some(),
    ///     true
    /// );
    /// # Ok::<(), grpc_resilience::ConfigError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the JSON path, value and why, for malformed
    /// JSON or a setting gRPC itself would reject.
    pub fn from_grpc_service_config(json: &str) -> Result<(Self, Vec<ImportWarning>), ConfigError> {
        let root: Value = serde_json::from_str(json).map_err(|e| {
            ConfigError::new("", None, format!("not valid JSON: {e}")).at_line(Some(e.line()))
        })?;
        let obj: &Map<String, Value> = root
            .as_object()
            .ok_or_else(|| err("", &root, "a service config is a JSON object"))?;
        let mut config = ResilienceConfig::new();
        let mut warnings = Vec::new();
        for (k, v) in obj {
            if key_is(k, "methodConfig") {
                let entries = v
                    .as_array()
                    .ok_or_else(|| err(k, v, "methodConfig is a list"))?;
                for (i, entry) in entries.iter().enumerate() {
                    let path = format!("methodConfig[{i}]");
                    let entry_obj = entry
                        .as_object()
                        .ok_or_else(|| err(&path, entry, "an object"))?;
                    let mut selectors = Vec::new();
                    let mut timeout = None;
                    let mut retry = None;
                    let mut hedging = None;
                    for (ek, ev) in entry_obj {
                        let p = format!("{path}.{ek}");
                        if key_is(ek, "name") {
                            let names = ev
                                .as_array()
                                .ok_or_else(|| err(&p, ev, "a list of names"))?;
                            for (j, name) in names.iter().enumerate() {
                                selectors.push(selector(&format!("{p}[{j}]"), name)?);
                            }
                        } else if key_is(ek, "timeout") {
                            timeout = Some(proto_duration(&p, ev)?);
                        } else if key_is(ek, "retryPolicy") {
                            retry = Some(retry_policy(&p, ev, &mut warnings)?);
                        } else if key_is(ek, "hedgingPolicy") {
                            hedging = Some(hedging_policy(&p, ev, &mut warnings)?);
                        } else {
                            warnings.push(ImportWarning::new(p, "not supported; ignored"));
                        }
                    }
                    if retry.is_some() && hedging.is_some() {
                        return Err(err(
                            &path,
                            entry,
                            "only one of `retryPolicy` and `hedgingPolicy` may be set (gRFC A6)",
                        ));
                    }
                    if selectors.is_empty() {
                        return Err(err(
                            &path,
                            entry,
                            "a methodConfig entry needs a `name` list",
                        ));
                    }
                    for sel in selectors {
                        if let Some(t) = timeout {
                            config = if sel == "*" {
                                config.with_timeout_default(t)
                            } else {
                                config.with_timeout_operation(sel.clone(), t)
                            };
                        }
                        if let Some(r) = &retry {
                            config = if sel == "*" {
                                config.with_retry_default(r.clone())
                            } else {
                                config.with_retry_operation(sel.clone(), r.clone())
                            };
                        }
                        if let Some(h) = &hedging {
                            config = if sel == "*" {
                                config.with_hedging_default(h.clone())
                            } else {
                                config.with_hedging_operation(sel, h.clone())
                            };
                        }
                    }
                }
            } else if key_is(k, "retryThrottling") {
                let t = v
                    .as_object()
                    .ok_or_else(|| err(k, v, "retryThrottling is an object"))?;
                let num = |name: &str| {
                    t.iter()
                        .find(|(tk, _)| key_is(tk, name))
                        .map(|(_, tv)| tv)
                        .and_then(Value::as_f64)
                        .ok_or_else(|| err(&format!("{k}.{name}"), v, "a number is required"))
                };
                let throttle = ThrottleSettings::new(num("maxTokens")?, num("tokenRatio")?);
                for tk in t.keys() {
                    if !key_is(tk, "maxTokens") && !key_is(tk, "tokenRatio") {
                        warnings.push(ImportWarning::new(
                            format!("{k}.{tk}"),
                            "not supported; ignored",
                        ));
                    }
                }
                config = config.with_retry_throttle(throttle);
            } else {
                warnings.push(ImportWarning::new(k.clone(), "not supported; ignored"));
            }
        }
        config.compile()?;
        Ok((config, warnings))
    }
}
