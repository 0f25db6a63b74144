//! Client streams answered early, under concurrent load, through the retry
//! layer: every request body the server receives is the body the caller
//! sent (or a prefix of it, cut by a stream reset), never a body with a gap;
//! every call succeeds with the whole body or fails with the server's code.
//!
//! The server answers half of the attempts with `UNAVAILABLE` at once and
//! reads their request on without resetting the stream
//! ([`Fault::early_status`]), so the retry starts while the first attempt
//! is still sending; bodies range from under to over the per-call replay
//! limit, so some outgrow it while the retry is in backoff or in flight.

use std::collections::HashMap;
use std::time::Duration;

use catalog_proto::Product;
use catalog_proto::command_service_client::CommandServiceClient;
use grpc_fault::{Fault, RecordedCall, body_digest};
use grpc_resilience_tests::{TestServer, eventually};
use grpc_retry::{Jitter, Retry, RetryLayer, RetryPolicies, RetryPolicy};
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;
use tower::ServiceBuilder;

const ROUNDS: usize = 4;
const CONCURRENT: usize = 24;
const BLOB: usize = 2048;
const PER_CALL_LIMIT: usize = 16 * 1024;

/// Call `call`'s products: 2 to 13 of them, so its body is about 4 to
/// 27 KiB, under or over the 16 KiB per-call limit.
fn products(call: usize) -> Vec<Product> {
    (0..2 + call % 12)
        .map(|i| Product {
            id: format!("c{call}-{i}"),
            name: "Lamp".into(),
            price_cents: 100,
            blob: vec![(call * 31 + i) as u8; BLOB],
        })
        .collect()
}

/// The request body as gRPC frames it: a 5-byte prefix per message.
fn framed(products: &[Product]) -> Vec<u8> {
    let mut body = Vec::new();
    for p in products {
        let message = p.encode_to_vec();
        body.push(0);
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(&message);
    }
    body
}

fn client(server: &TestServer) -> CommandServiceClient<Retry<Channel>> {
    let policy = RetryPolicy::default()
        .with_initial_delay(Duration::from_millis(2))
        .with_max_delay(Duration::from_millis(10))
        .with_jitter(Jitter::None);
    let layer = RetryLayer::new(RetryPolicies::new(policy).unwrap())
        .with_buffer_limits(PER_CALL_LIMIT, 4 << 20)
        .unwrap();
    CommandServiceClient::new(ServiceBuilder::new().layer(layer).service(server.channel()))
}

/// Sends call `id`'s products, 1 ms apart: the early answer comes while
/// the client is still streaming.
async fn import(
    mut client: CommandServiceClient<Retry<Channel>>,
    id: usize,
) -> Result<(u32, u64), Code> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for p in products(id) {
            tokio::time::sleep(Duration::from_millis(1)).await;
            if tx.send(p).await.is_err() {
                return;
            }
        }
    });
    let mut request = tonic::Request::new(
        tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx),
    );
    request
        .metadata_mut()
        .insert("x-call", id.to_string().parse().unwrap());
    // Bounded: a replay waiting for a wakeup that never comes ends here.
    request.set_timeout(Duration::from_secs(3));
    match client.import_products(request).await {
        Ok(response) => {
            let r = response.into_inner();
            Ok((r.imported, r.blob_bytes))
        }
        Err(status) => Err(status.code()),
    }
}

fn call_id(call: &RecordedCall) -> usize {
    call.headers["x-call"].to_str().unwrap().parse().unwrap()
}

/// The body `call` received is a prefix of the body its caller sent (the
/// whole body, or less when the stream was reset).
fn received_a_prefix(call: &RecordedCall, bodies: &HashMap<usize, Vec<u8>>) -> bool {
    let sent = &bodies[&call_id(call)];
    let n = call.bytes_received as usize;
    n <= sent.len() && body_digest(&sent[..n]) == call.body_digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_answers_under_load_never_give_the_server_a_different_body() {
    let server = TestServer::start().await;
    server
        .faults
        .random(
            "ImportProducts",
            8,
            [(0.5, Fault::early_status(Code::Unavailable))],
        )
        .unwrap();
    let bodies: HashMap<usize, Vec<u8>> = (0..ROUNDS * CONCURRENT)
        .map(|id| (id, framed(&products(id))))
        .collect();
    let client = client(&server);

    let mut outcomes = Vec::new();
    let run = async {
        for round in 0..ROUNDS {
            let calls: Vec<_> = (0..CONCURRENT)
                .map(|i| {
                    let id = round * CONCURRENT + i;
                    (id, tokio::spawn(import(client.clone(), id)))
                })
                .collect();
            for (id, call) in calls {
                outcomes.push((id, call.await.unwrap()));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the load finishes in time");
    drop(client);

    // The server: every body it read is a prefix of the one sent. Bodies
    // still being read settle once the client's streams end.
    let settled = eventually(Duration::from_secs(10), || {
        server
            .faults
            .calls_to("ImportProducts")
            .unwrap()
            .iter()
            .all(|c| received_a_prefix(c, &bodies))
    })
    .await;
    let calls = server.faults.calls_to("ImportProducts").unwrap();
    for call in &calls {
        assert!(
            settled && received_a_prefix(call, &bodies),
            "call {} ({}, attempt after {:?}) got {} bytes that are not a prefix of the {} sent",
            call_id(call),
            call.fault,
            call.headers.get("grpc-previous-rpc-attempts"),
            call.bytes_received,
            bodies[&call_id(call)].len(),
        );
    }

    // The caller: the whole body's products, or the server's code.
    let mut succeeded = 0;
    let mut expected_bytes = 0;
    for (id, outcome) in &outcomes {
        let n = products(*id).len();
        match outcome {
            Ok(got) => {
                assert_eq!(*got, (n as u32, (n * BLOB) as u64), "call {id}");
                succeeded += 1;
                expected_bytes += (n * BLOB) as u64;
            }
            Err(code) => assert_eq!(*code, Code::Unavailable, "call {id}"),
        }
    }
    assert_eq!(
        server.catalog.stats().imported_bytes,
        expected_bytes,
        "the handler completed exactly the calls that succeeded"
    );

    // A body within the limit is always replayable: such a call fails only
    // when all three attempts were answered UNAVAILABLE.
    for (id, outcome) in &outcomes {
        if outcome.is_err() && bodies[id].len() <= PER_CALL_LIMIT {
            let attempts: Vec<_> = calls.iter().filter(|c| call_id(c) == *id).collect();
            assert!(
                attempts.len() == 3 && attempts.iter().all(|c| c.fault == "early_status"),
                "call {id} fits the limit yet failed after {attempts:?}"
            );
        }
    }

    // The load did what it is for: retries whose replay was whole, and
    // bodies over the limit.
    let whole_replays = calls
        .iter()
        .filter(|c| c.headers.contains_key("grpc-previous-rpc-attempts"))
        .filter(|c| c.bytes_received as usize == bodies[&call_id(c)].len())
        .count();
    let over_the_limit = bodies.values().filter(|b| b.len() > PER_CALL_LIMIT).count();
    assert!(
        succeeded > 0 && whole_replays > 0 && over_the_limit > 0,
        "succeeded {succeeded}, whole replays {whole_replays}, over the limit {over_the_limit}"
    );
}
