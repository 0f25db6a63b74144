//! How many calls a partition admits at once: a fixed number, or a limit
//! that follows measured latency ([`Aimd`], [`Gradient`]).
//!
//! An adaptive limit takes one sample per completed call: the time from
//! admission to the response headers (for a unary call, its latency; for a
//! streaming call, the time to its first response, so a long stream is not
//! mistaken for a slow server), how many calls were in flight when it was
//! admitted, and whether it ended with an overload signal
//! (`RESOURCE_EXHAUSTED`, `UNAVAILABLE` or `DEADLINE_EXCEEDED`, from the
//! server or from a layer below). Calls the caller cancelled give no
//! sample.

mod aimd;
mod gradient;

use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;

pub use aimd::Aimd;
pub use gradient::Gradient;

/// A partition's concurrency limit.
#[derive(Clone, Debug, PartialEq)]
pub enum Limit {
    /// At most this many calls in flight, always.
    Fixed(u32),
    /// Additive increase, multiplicative decrease on overload or high
    /// latency.
    Aimd(Aimd),
    /// A gradient of the no-load latency over the current latency.
    Gradient(Gradient),
}

impl Limit {
    /// The limit a partition starts with.
    pub fn initial(&self) -> u32 {
        match self {
            Limit::Fixed(n) => *n,
            Limit::Aimd(a) => a.initial_limit,
            Limit::Gradient(g) => g.initial_limit,
        }
    }

    /// Whether the limit follows latency.
    pub fn is_adaptive(&self) -> bool {
        !matches!(self, Limit::Fixed(_))
    }

    pub(crate) fn state(&self) -> LimitState {
        match self {
            Limit::Fixed(_) => LimitState::Fixed,
            Limit::Aimd(a) => LimitState::Aimd(aimd::AimdState::new(a.clone())),
            Limit::Gradient(g) => LimitState::Gradient(gradient::GradientState::new(g.clone())),
        }
    }
}

/// What one completed call says about the server.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Sample {
    /// When the call was admitted.
    pub(crate) start: Instant,
    /// Admission to response headers.
    pub(crate) rtt: Duration,
    /// Calls in flight when it was admitted, itself included.
    pub(crate) in_flight: u32,
    /// It ended with an overload signal.
    pub(crate) dropped: bool,
}

/// Whether a call's final code says the server (or the path to it) is
/// overloaded.
pub(crate) fn is_overload(code: Code) -> bool {
    matches!(
        code,
        Code::ResourceExhausted | Code::Unavailable | Code::DeadlineExceeded
    )
}

/// The running state of a limit algorithm.
#[derive(Debug)]
pub(crate) enum LimitState {
    Fixed,
    Aimd(aimd::AimdState),
    Gradient(gradient::GradientState),
}

impl LimitState {
    /// Takes a sample; returns the new limit.
    pub(crate) fn update(&mut self, sample: Sample) -> Option<u32> {
        match self {
            LimitState::Fixed => None,
            LimitState::Aimd(state) => Some(state.update(sample)),
            LimitState::Gradient(state) => Some(state.update(sample)),
        }
    }
}
