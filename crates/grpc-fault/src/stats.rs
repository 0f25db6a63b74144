//! What the fault layer saw: counters per method and a log of calls.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use http::HeaderMap;

/// Counters of one method (or a sum over several), as seen by the fault
/// layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MethodStats {
    /// Requests that reached the layer.
    pub calls: u64,
    /// Times the handler (the wrapped service) was run.
    pub handler_runs: u64,
    /// Calls that got a fault other than [`Fault::pass`](crate::Fault::pass)
    /// (a pass with a delay counts).
    pub faults_injected: u64,
    /// Request body bytes the handler read (gRPC framing included).
    pub bytes_received: u64,
    /// Calls whose response was dropped before its end: the client
    /// cancelled, or its deadline ended the call.
    pub cancelled: u64,
}

impl MethodStats {
    pub(crate) fn add(&mut self, other: &MethodStats) {
        self.calls += other.calls;
        self.handler_runs += other.handler_runs;
        self.faults_injected += other.faults_injected;
        self.bytes_received += other.bytes_received;
        self.cancelled += other.cancelled;
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    calls: AtomicU64,
    handler_runs: AtomicU64,
    faults_injected: AtomicU64,
    bytes_received: AtomicU64,
    cancelled: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> MethodStats {
        MethodStats {
            calls: self.calls.load(Ordering::Relaxed),
            handler_runs: self.handler_runs.load(Ordering::Relaxed),
            faults_injected: self.faults_injected.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
        }
    }
}

/// One call as the fault layer saw it.
#[derive(Clone, Debug)]
pub struct RecordedCall {
    /// The request path, e.g. `/catalog.v1.QueryService/GetProduct`.
    pub path: String,
    /// The request headers (gRPC metadata included: `grpc-timeout`,
    /// `grpc-previous-rpc-attempts`, `idempotency-key`, ...).
    pub headers: HeaderMap,
    /// [`Fault::name`](crate::Fault::name) of the fault the call got.
    pub fault: &'static str,
    /// Whether the handler ran.
    pub handler_ran: bool,
    /// Request body bytes the handler read so far (for
    /// [`Fault::early_status`](crate::Fault::early_status), the layer).
    pub bytes_received: u64,
    /// FNV-1a digest of those bytes ([`body_digest`]); equal digests
    /// mean byte-identical bodies.
    pub body_digest: u64,
    /// Whether the response was dropped before its end.
    pub cancelled: bool,
}

/// The live state of one call, shared by the layer, the request body and
/// the response body.
#[derive(Debug)]
pub(crate) struct Call {
    pub(crate) path: String,
    pub(crate) headers: HeaderMap,
    pub(crate) fault: &'static str,
    pub(crate) method: Arc<Counters>,
    handler_ran: AtomicBool,
    bytes: AtomicU64,
    digest: AtomicU64,
    cancelled: AtomicBool,
}

impl Call {
    pub(crate) fn new(
        path: String,
        headers: HeaderMap,
        fault: &'static str,
        method: Arc<Counters>,
        injected: bool,
    ) -> Self {
        method.calls.fetch_add(1, Ordering::Relaxed);
        if injected {
            method.faults_injected.fetch_add(1, Ordering::Relaxed);
        }
        Call {
            path,
            headers,
            fault,
            method,
            handler_ran: AtomicBool::new(false),
            bytes: AtomicU64::new(0),
            digest: AtomicU64::new(FNV_OFFSET),
            cancelled: AtomicBool::new(false),
        }
    }

    pub(crate) fn handler_runs(&self) {
        self.handler_ran.store(true, Ordering::Relaxed);
        self.method.handler_runs.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds request body bytes; only the request body calls this, in order.
    pub(crate) fn received(&self, data: &[u8]) {
        let digest = fnv1a(self.digest.load(Ordering::Relaxed), data);
        self.digest.store(digest, Ordering::Relaxed);
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.method
            .bytes_received
            .fetch_add(data.len() as u64, Ordering::Relaxed);
    }

    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
        self.method.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> RecordedCall {
        RecordedCall {
            path: self.path.clone(),
            headers: self.headers.clone(),
            fault: self.fault,
            handler_ran: self.handler_ran.load(Ordering::Relaxed),
            bytes_received: self.bytes.load(Ordering::Relaxed),
            body_digest: self.digest.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
        }
    }
}

/// Marks a call cancelled if dropped before [`CallGuard::finish`].
#[derive(Debug)]
pub(crate) struct CallGuard {
    call: Option<Arc<Call>>,
}

impl CallGuard {
    pub(crate) fn new(call: Arc<Call>) -> Self {
        CallGuard { call: Some(call) }
    }

    pub(crate) fn finish(&mut self) {
        self.call = None;
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.cancel();
        }
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut hash: u64, data: &[u8]) -> u64 {
    for &b in data {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// The FNV-1a (64-bit) digest [`RecordedCall::body_digest`] uses, for
/// comparing a recorded body with bytes a test holds.
pub fn body_digest(data: &[u8]) -> u64 {
    fnv1a(FNV_OFFSET, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_incremental_and_known() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(body_digest(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(body_digest(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(body_digest(b"foobar"), 0x8594_4171_f739_67e8);
        let call = Call::new(
            "/a.B/C".into(),
            HeaderMap::new(),
            "pass",
            Arc::default(),
            false,
        );
        call.received(b"foo");
        call.received(b"bar");
        let rec = call.snapshot();
        assert_eq!(rec.body_digest, body_digest(b"foobar"));
        assert_eq!(rec.bytes_received, 6);
        assert_eq!(call.method.snapshot().bytes_received, 6);
    }

    #[test]
    fn guard_counts_cancellation_unless_finished() {
        let method = Arc::new(Counters::default());
        let call = Arc::new(Call::new(
            "/a.B/C".into(),
            HeaderMap::new(),
            "pass",
            method.clone(),
            false,
        ));
        drop(CallGuard::new(call.clone()));
        let mut finished = CallGuard::new(call.clone());
        finished.finish();
        drop(finished);
        assert_eq!(method.snapshot().cancelled, 1);
        assert!(call.snapshot().cancelled);
    }
}
