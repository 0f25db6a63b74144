//! Taking the service that was made ready.

/// Takes the service `poll_ready` made ready, leaving a fresh clone in its
/// place.
///
/// tower's contract: the service made ready is the one to call. A layer
/// that sends a call later (from its future, after a wait) moves the ready
/// service into that future; one that refuses a call after `poll_ready`
/// drops it, which gives back what its readiness reserved (a `Buffer`
/// slot, a concurrency permit) instead of holding it until the next call.
/// Either way the clone left behind is made ready again before the next
/// call, as usual.
///
/// ```
/// use grpc_resilience_core::take_ready;
///
/// let mut service = vec![1]; // any `Clone` service
/// let ready = take_ready(&mut service);
/// assert_eq!((ready, service), (vec![1], vec![1]));
/// ```
#[inline]
pub fn take_ready<S: Clone>(service: &mut S) -> S {
    let fresh = service.clone();
    std::mem::replace(service, fresh)
}
