//! Run-time fault settings of the built-in services.
//!
//! Each built-in service has its own [`FaultInjector`]; a
//! [`FaultSettings`] says what it should do to every call (error rates per
//! code, lost responses, added latency, or a full outage) and is applied
//! as one seeded random plan, so the same settings give the same sequence
//! of faults.

use std::fmt;
use std::time::Duration;

use grpc_fault::{Fault, FaultInjector};
use grpc_resilience_core::codes::{code_name, parse_code};
use tonic::Code;

/// What a service does to its calls.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultSettings {
    /// Every call fails with `UNAVAILABLE` (the service is down).
    pub outage: bool,
    /// Share of calls (0 to 1) failing with each code.
    pub errors: Vec<(Code, f64)>,
    /// Share of calls whose handler runs but whose response is lost (the
    /// client sees `UNAVAILABLE`).
    pub lost_responses: f64,
    /// Added before every call is handled.
    pub latency: Duration,
}

/// Settings that cannot be applied; says which value and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultSettingsError(pub String);

impl fmt::Display for FaultSettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FaultSettingsError {}

/// The longest latency one can add (a bound for a typo).
pub const MAX_LATENCY: Duration = Duration::from_secs(60);

impl FaultSettings {
    /// No fault.
    pub fn none() -> Self {
        Self::default()
    }

    /// Whether these settings inject anything.
    pub fn is_none(&self) -> bool {
        *self == Self::default()
    }

    /// Checks every value.
    ///
    /// # Errors
    ///
    /// [`FaultSettingsError`] naming the bad value.
    pub fn validate(&self) -> Result<(), FaultSettingsError> {
        let share = |what: String, p: f64| {
            if (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                Err(FaultSettingsError(format!(
                    "{what} is {p}: a share of calls must be within 0 and 1"
                )))
            }
        };
        let mut total = 0.0;
        for (code, p) in &self.errors {
            if *code == Code::Ok {
                return Err(FaultSettingsError(
                    "error rate for OK: an injected error needs an error code".into(),
                ));
            }
            share(format!("the error rate for {}", code_name(*code)), *p)?;
            total += p;
        }
        share("lostResponseRate".into(), self.lost_responses)?;
        total += self.lost_responses;
        if total > 1.0 + 1e-9 {
            return Err(FaultSettingsError(format!(
                "error and lost-response rates add up to {total}, more than 1"
            )));
        }
        if self.latency > MAX_LATENCY {
            return Err(FaultSettingsError(format!(
                "latency {} ms is above the limit of {} ms",
                self.latency.as_millis(),
                MAX_LATENCY.as_millis()
            )));
        }
        Ok(())
    }

    /// Applies these settings to every method `injector` serves, drawing
    /// faults from `seed`.
    ///
    /// # Errors
    ///
    /// [`FaultSettingsError`] if a value is invalid (nothing changes then).
    pub fn apply(&self, injector: &FaultInjector, seed: u64) -> Result<(), FaultSettingsError> {
        self.apply_to(injector, "*", seed)
    }

    /// Applies these settings to the methods `selector` names (e.g.
    /// `catalog.v1.QueryService/*`), drawing faults from `seed`; other
    /// methods (the health service) are left alone.
    ///
    /// # Errors
    ///
    /// [`FaultSettingsError`] if a value is invalid (nothing changes then).
    pub fn apply_to(
        &self,
        injector: &FaultInjector,
        selector: &str,
        seed: u64,
    ) -> Result<(), FaultSettingsError> {
        self.validate()?;
        let rejected = |e: grpc_fault::FaultConfigError| FaultSettingsError(e.to_string());
        if self.outage {
            let down = Fault::status(Code::Unavailable)
                .with_message("injected outage: the service is down")
                .with_delay(self.latency);
            return injector.always(selector, down).map_err(rejected);
        }
        if self.is_none() {
            injector.clear_all();
            return Ok(());
        }
        let delay = self.latency;
        let mut choices: Vec<(f64, Fault)> = self
            .errors
            .iter()
            .map(|(code, p)| (*p, Fault::status(*code).with_delay(delay)))
            .collect();
        if self.lost_responses > 0.0 {
            choices.push((
                self.lost_responses,
                Fault::lose_response().with_delay(delay),
            ));
        }
        if !delay.is_zero() {
            let rest = 1.0 - choices.iter().map(|(p, _)| p).sum::<f64>();
            if rest > 0.0 {
                choices.push((rest, Fault::pass().with_delay(delay)));
            }
        }
        injector.random(selector, seed, choices).map_err(rejected)
    }
}

/// Parses a gRPC code name (`UNAVAILABLE`, `unavailable`, `14`).
///
/// # Errors
///
/// [`FaultSettingsError`] naming the text.
pub fn code_from_name(text: &str) -> Result<Code, FaultSettingsError> {
    if let Ok(n) = text.parse::<i32>() {
        let code = Code::from_i32(n);
        if code as i32 == n {
            return Ok(code);
        }
    }
    parse_code(text).map_err(|e| FaultSettingsError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_above_one_are_refused_with_the_value() {
        let settings = FaultSettings {
            errors: vec![(Code::Unavailable, 0.8)],
            lost_responses: 0.3,
            ..FaultSettings::none()
        };
        let err = settings.validate().unwrap_err();
        assert!(err.0.contains("more than 1"), "{err}");
        let bad = FaultSettings {
            lost_responses: -0.1,
            ..FaultSettings::none()
        };
        assert!(bad.validate().unwrap_err().0.contains("lostResponseRate"));
    }

    #[test]
    fn code_names_and_numbers_parse() {
        assert_eq!(code_from_name("UNAVAILABLE").unwrap(), Code::Unavailable);
        assert_eq!(code_from_name("14").unwrap(), Code::Unavailable);
        assert!(code_from_name("NOPE").is_err());
        assert!(code_from_name("99").is_err());
    }
}
