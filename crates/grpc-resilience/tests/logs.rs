//! The design's two WARN lines with their fields, and the call and attempt
//! spans. Its own test binary: tracing caches callsite interest per process.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use catalog_proto::GetProductRequest;
use catalog_proto::query_service_client::QueryServiceClient;
use grpc_fault::Fault;
use grpc_resilience::{ResilienceConfig, ResilientChannel};
use grpc_resilience_tests::TestServer;
use tonic::Code;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

type Fields = BTreeMap<String, String>;

#[derive(Debug)]
struct SpanSeen {
    name: &'static str,
    fields: Fields,
    parent: Option<u64>,
}

#[derive(Debug)]
struct EventSeen {
    level: Level,
    fields: Fields,
    /// Span ids from the innermost out.
    scope: Vec<u64>,
}

#[derive(Debug, Default)]
struct Captured {
    spans: HashMap<u64, SpanSeen>,
    events: Vec<EventSeen>,
}

struct FieldVisitor<'a>(&'a mut Fields);

impl Visit for FieldVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Captured>>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        attrs.record(&mut FieldVisitor(&mut fields));
        let parent = ctx
            .span(id)
            .and_then(|s| s.parent())
            .map(|p| p.id().into_u64());
        self.0.lock().unwrap().spans.insert(
            id.into_u64(),
            SpanSeen {
                name: attrs.metadata().name(),
                fields,
                parent,
            },
        );
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some(span) = self.0.lock().unwrap().spans.get_mut(&id.into_u64()) {
            values.record(&mut FieldVisitor(&mut span.fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        event.record(&mut FieldVisitor(&mut fields));
        let scope = ctx
            .event_scope(event)
            .map(|scope| scope.map(|s| s.id().into_u64()).collect())
            .unwrap_or_default();
        self.0.lock().unwrap().events.push(EventSeen {
            level: *event.metadata().level(),
            fields,
            scope,
        });
    }
}

#[tokio::test]
async fn the_designs_warn_lines_with_their_fields_inside_the_call_span() {
    let capture = Capture::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(capture.clone()))
        .expect("the only subscriber of this binary");

    let server = TestServer::start().await;
    server
        .faults
        .always("GetProduct", Fault::status(Code::Unavailable))
        .unwrap();
    let config = ResilienceConfig::from_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/telemetry.toml"
    ))
    .unwrap();
    let channel = ResilientChannel::new(server.channel(), &config).unwrap();
    let mut client = QueryServiceClient::new(channel);
    for _ in 0..2 {
        let status = client
            .get_product(GetProductRequest { id: "p1".into() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }

    let seen = capture.0.lock().unwrap();
    let find = |message: &str| {
        seen.events
            .iter()
            .find(|e| e.fields.get("message").map(String::as_str) == Some(message))
            .unwrap_or_else(|| panic!("no event `{message}` in {:#?}", seen.events))
    };

    let retry = find("gRPC call failed with unavailable, retrying in 200ms (attempt 1/3)");
    assert_eq!(retry.level, Level::WARN);
    for (field, value) in [
        ("service", "catalog.v1.QueryService"),
        ("method", "GetProduct"),
        ("code", "UNAVAILABLE"),
        ("attempt", "1"),
        ("max_attempts", "3"),
        ("delay_ms", "200"),
    ] {
        assert_eq!(
            retry.fields.get(field).map(String::as_str),
            Some(value),
            "{field}: {retry:?}"
        );
    }
    find("gRPC call failed with unavailable, retrying in 400ms (attempt 2/3)");

    let opening = find("Circuit breaker opening after 5 failures");
    assert_eq!(opening.level, Level::WARN);
    assert_eq!(opening.fields["breaker"], "query");
    assert_eq!(opening.fields["failures"], "5");

    // The retry line is logged inside the logical call's span, which
    // carries OpenTelemetry's RPC fields and, at the end, the status.
    let call = retry
        .scope
        .iter()
        .map(|id| &seen.spans[id])
        .find(|s| s.name == "grpc_call")
        .unwrap_or_else(|| panic!("the retry line is not inside a grpc_call span: {retry:?}"));
    assert_eq!(call.fields["rpc.system"], "grpc");
    assert_eq!(call.fields["rpc.service"], "catalog.v1.QueryService");
    assert_eq!(call.fields["rpc.method"], "GetProduct");
    assert_eq!(call.fields["otel.kind"], "client");
    assert_eq!(call.fields["rpc.grpc.status_code"], "14");

    // Each call has one span; its attempts are its children.
    let calls: Vec<u64> = seen
        .spans
        .iter()
        .filter(|(_, s)| s.name == "grpc_call")
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(calls.len(), 2);
    let attempts: Vec<&SpanSeen> = seen
        .spans
        .values()
        .filter(|s| s.name == "grpc_attempt")
        .collect();
    assert!(attempts.len() >= 3, "{attempts:?}");
    for attempt in attempts {
        assert!(
            attempt.parent.is_some_and(|p| calls.contains(&p)),
            "an attempt outside a call span: {attempt:?}"
        );
        // OpenTelemetry's RPC fields, the status its head gave, the
        // breaker's state when it was admitted (recorded by the breaker
        // below, into the span current while the retry layer sends it).
        for (field, value) in [
            ("otel.kind", "client"),
            ("rpc.system", "grpc"),
            ("rpc.service", "catalog.v1.QueryService"),
            ("rpc.method", "GetProduct"),
            ("rpc.grpc.status_code", "14"),
            ("hedge", "false"),
        ] {
            assert_eq!(
                attempt.fields.get(field).map(String::as_str),
                Some(value),
                "{field}: {attempt:?}"
            );
        }
        assert!(
            ["closed", "open", "half_open"].contains(&attempt.fields["breaker.state"].as_str()),
            "{attempt:?}"
        );
        // A retry says how long it waited and why.
        if attempt.fields["attempt"] != "1" {
            assert!(attempt.fields.contains_key("backoff_ms"), "{attempt:?}");
            assert_eq!(attempt.fields["transparent"], "false", "{attempt:?}");
        } else {
            assert!(!attempt.fields.contains_key("backoff_ms"), "{attempt:?}");
        }
    }
}
