//! Model tests: every interleaving (up to a preemption bound) of calls
//! taking, waiting for, giving up and releasing a partition's slots.
//!
//! `RUSTFLAGS="--cfg grpc_resilience_loom" cargo test --release -p grpc-bulkhead --lib loom`
//!
//! Each model ends with every call finished and checks that the partition
//! is empty again: no slot leaked (a grant nobody took) and none given
//! twice (the counter would wrap). A waiter that is never granted its
//! slot blocks for ever, which loom reports as a deadlock: that is the
//! lost wake-up these models look for.

use std::time::Duration;

use loom::thread;
use std::sync::Arc;

use super::*;
use crate::future::Ticket;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

fn partition(limit: u32, queue: u32) -> Arc<Partition> {
    let config = BulkheadConfig::builder()
        .max_concurrent(limit)
        .max_queue(queue)
        .max_wait(Duration::from_secs(1))
        .build()
        .expect("a valid config");
    Arc::new(Partition::new("loom", config))
}

/// A call as the service makes it: the fast path, else the queue, then
/// waiting until its slot is granted. The call then ends, freeing it.
fn call(p: &Partition) {
    if p.acquire().is_none() {
        match p.enqueue() {
            Enqueued::Acquired(_) => {}
            Enqueued::Waiting(rx) => {
                loom::future::block_on(rx).expect("a waiter is granted a slot, not dropped");
            }
            Enqueued::Full => panic!("the queue has room in these models"),
        }
    }
    p.release();
}

fn assert_empty(p: &Partition) {
    assert_eq!(p.in_flight(), 0, "a slot leaked or was given twice");
    assert_eq!(p.queued(), 0, "a live waiter is left in the queue");
}

/// The last slot is released while a newcomer finds the partition full
/// and queues: the release must see the waiter, or the waiter must see
/// the free slot.
#[test]
fn loom_a_release_racing_a_newcomer_loses_no_wake_up() {
    model(|| {
        let p = partition(1, 1);
        assert_eq!(p.acquire(), Some(1));
        let holder = {
            let p = p.clone();
            thread::spawn(move || p.release())
        };
        call(&p);
        holder.join().unwrap();
        assert_empty(&p);
    });
}

/// A queued call's wait ends (its deadline, `max_wait`) just as the slot
/// is handed to it: either it takes the slot and frees it, or the grant
/// fails and the slot is freed by the releaser. Never both, never
/// neither.
#[test]
fn loom_a_grant_racing_a_give_up_leaks_no_slot() {
    model(|| {
        let p = partition(1, 1);
        assert_eq!(p.acquire(), Some(1));
        let Enqueued::Waiting(rx) = p.enqueue() else {
            panic!("the partition is full: the call queues");
        };
        let mut ticket = Ticket {
            rx,
            partition: p.clone(),
            claimed: false,
        };
        let holder = {
            let p = p.clone();
            thread::spawn(move || p.release())
        };
        if ticket.give_up() {
            // Granted as it gave up: the call holds the slot, and passes it
            // on (the bulkhead does so for a call past its deadline).
            ticket.claimed = true;
            p.release();
        }
        drop(ticket);
        holder.join().unwrap();
        assert_empty(&p);
    });
}

/// Two calls queue; the first is dropped (its caller went away) while
/// the slot is released: the second must get the slot whichever of the
/// two the release picked.
#[test]
fn loom_a_dropped_waiter_passes_its_grant_on() {
    model(|| {
        let p = partition(1, 2);
        assert_eq!(p.acquire(), Some(1));
        let Enqueued::Waiting(first) = p.enqueue() else {
            panic!("queues");
        };
        let Enqueued::Waiting(second) = p.enqueue() else {
            panic!("queues");
        };
        let ticket = Ticket {
            rx: first,
            partition: p.clone(),
            claimed: false,
        };
        let holder = {
            let p = p.clone();
            thread::spawn(move || p.release())
        };
        let leaver = thread::spawn(move || drop(ticket));
        loom::future::block_on(second).expect("the second waiter gets the slot");
        p.release();
        holder.join().unwrap();
        leaver.join().unwrap();
        assert_empty(&p);
    });
}

/// A queued call, a newcomer and a release, all at once: the newcomer
/// does not take the slot past the queued call for good (both finish),
/// and the partition ends empty.
#[test]
fn loom_a_newcomer_racing_a_hand_off_strands_nobody() {
    model(|| {
        let p = partition(1, 2);
        assert_eq!(p.acquire(), Some(1));
        let Enqueued::Waiting(rx) = p.enqueue() else {
            panic!("queues");
        };
        let holder = {
            let p = p.clone();
            thread::spawn(move || p.release())
        };
        let newcomer = {
            let p = p.clone();
            thread::spawn(move || call(&p))
        };
        loom::future::block_on(rx).expect("the queued call gets a slot");
        p.release();
        holder.join().unwrap();
        newcomer.join().unwrap();
        assert_empty(&p);
    });
}
