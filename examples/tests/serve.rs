//! `catalog serve` as a user runs it: the binary, its printed URLs, and
//! `--target-command` / `--target-query` pointing at other servers.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use grpc_resilience_examples::catalog::client::GraphqlClient;
use grpc_resilience_examples::catalog::system::{System, SystemOptions};
use serde_json::json;

/// The child, killed by its PID when dropped.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `catalog serve` with `args` on free ports and returns it with
/// its printed stdout up to the "Ctrl-C" line (at most 100 lines and 30 s;
/// past that the child is killed and the test fails).
async fn serve(args: &[&str]) -> (Serve, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_catalog"))
        .arg("serve")
        .args([
            "--http-port",
            "0",
            "--command-port",
            "0",
            "--query-port",
            "0",
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("catalog serve starts");
    let stdout = child.stdout.take().expect("stdout");
    let serve = Serve(child);
    let read = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines().take(100) {
            let Ok(line) = line else { break };
            let done = line.starts_with("Ctrl-C");
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    });
    match tokio::time::timeout(Duration::from_secs(30), read).await {
        Ok(lines) => (serve, lines.expect("the reader ends")),
        // Dropping `serve` kills the child, which ends the reader.
        Err(_) => panic!("catalog serve printed no \"Ctrl-C\" line within 30 s"),
    }
}

/// Runs `catalog serve` with `args`, expecting it to refuse them: returns
/// its stderr (at most 30 s; past that the child is killed and the test
/// fails).
async fn refused(args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_catalog"))
        .arg("serve")
        .args([
            "--http-port",
            "0",
            "--command-port",
            "0",
            "--query-port",
            "0",
        ])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("catalog serve starts");
    let stderr = child.stderr.take().expect("stderr");
    let mut serve = Serve(child);
    let read = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut text);
        text
    });
    let text = match tokio::time::timeout(Duration::from_secs(30), read).await {
        Ok(text) => text.expect("the reader ends"),
        Err(_) => panic!("catalog serve {args:?} did not stop within 30 s"),
    };
    let status = serve.0.wait().expect("catalog serve ends");
    assert!(
        !status.success(),
        "catalog serve {args:?} succeeded: {text}"
    );
    text
}

fn url(lines: &[String], label: &str) -> String {
    lines
        .iter()
        .find_map(|l| l.trim().strip_prefix(label).map(|u| u.trim().to_owned()))
        .unwrap_or_else(|| panic!("no {label} line in {lines:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_prints_its_urls_and_answers_there() {
    let (_serve, lines) = serve(&[]).await;
    let graphql = url(&lines, "GraphiQL");
    assert!(graphql.starts_with("http://127.0.0.1:"), "{lines:?}");
    let client = GraphqlClient::new(graphql, Duration::from_secs(10));
    let r = client
        .query(r#"{ product(id: "p3") { name } stack }"#)
        .await
        .unwrap();
    assert_eq!(
        r.data(),
        &json!({"product": {"name": "Product 3"}, "stack": "resilient"})
    );

    let dashboard = reqwest::get(url(&lines, "dashboard")).await.unwrap();
    assert!(dashboard.text().await.unwrap().contains("dashboard.js"));
    assert!(
        lines.iter().any(|l| l.contains("failure-rate mode")
            && l.contains("[examples/config/catalog.toml [circuit_breakers.query]]")),
        "every setting with the file and key it came from: {lines:?}"
    );
}

/// `grpc.client.call.count` comes from the facade's call telemetry alone:
/// one sample per logical call, in one series per method and code (the
/// child process's metrics see only this test's calls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_call_is_counted_once_by_the_facade() {
    let (_serve, lines) = serve(&[]).await;
    let client = GraphqlClient::new(url(&lines, "GraphiQL"), Duration::from_secs(10));
    for id in ["p1", "p2", "p3", "p4", "p5"] {
        let r = client
            .query(&format!(r#"{{ product(id: "{id}") {{ id }} }}"#))
            .await
            .unwrap();
        assert_eq!(r.data()["product"]["id"], id, "{:?}", r.body);
    }
    let text = reqwest::get(url(&lines, "metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("grpc_client_call_count{") && l.contains(r#"method="GetProduct""#)
        })
        .collect();
    assert_eq!(series.len(), 1, "one series: {series:?}");
    assert!(series[0].contains(r#"code="OK""#), "{series:?}");
    let count: f64 = series[0].rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(count, 5.0, "five calls, counted once each: {series:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_config_loads_your_file_and_refuses_a_bad_one() {
    let dir = std::env::temp_dir().join(format!("catalog-serve-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let built_in = include_str!("../config/catalog.toml");
    let mine = dir.join("mine.toml");
    std::fs::write(
        &mine,
        built_in.replace("max_tokens = 20\n", "max_tokens = 12\n"),
    )
    .unwrap();
    assert_ne!(std::fs::read_to_string(&mine).unwrap(), built_in);
    let path = mine.to_str().unwrap();
    let (_serve, lines) = serve(&["--config", path]).await;
    let throttle = lines
        .iter()
        .find(|l| l.contains("retry throttle"))
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(throttle.contains("12 tokens"), "{throttle}");
    assert!(
        throttle.contains(&format!("[{path} [retry.throttle]]")),
        "{throttle}"
    );

    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        built_in.replace("max_attempts = 3", "max_attempts = 0"),
    )
    .unwrap();
    let text = refused(&["--config", bad.to_str().unwrap()]).await;
    assert!(text.contains("bad.toml"), "{text}");
    assert!(text.contains("retry.default.max_attempts"), "{text}");

    let missing = refused(&["--config", dir.join("nope.toml").to_str().unwrap()]).await;
    assert!(missing.contains("nope.toml"), "{missing}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_targets_calls_your_servers() {
    // "Your" servers: the built-in ones of another system.
    let theirs = System::start(SystemOptions::default()).await.unwrap();
    let backend = theirs.backend.as_ref().unwrap();
    let command = format!("http://{}", backend.command_addr);
    let query = format!("http://{}", backend.query_addr);
    let (_serve, lines) = serve(&["--target-command", &command, "--target-query", &query]).await;
    let client = GraphqlClient::new(url(&lines, "GraphiQL"), Duration::from_secs(10));
    let r = client
        .query(r#"mutation { createProduct(input: {id: "yours", name: "Yours", priceCents: 1}) { id } }"#)
        .await
        .unwrap();
    assert_eq!(r.data()["createProduct"]["id"], "yours", "{:?}", r.body);
    assert_eq!(backend.catalog.stats().writes, 1, "written to the target");

    let r = client
        .query(r#"mutation { setFaults(service: QUERY, faults: {outage: true}) { outage } }"#)
        .await
        .unwrap();
    let message = r.error().expect("no faults on external targets")["message"].to_string();
    assert!(message.contains("built-in services"), "{message}");

    // A bad target is refused with its value named.
    let stderr = refused(&["--target", "not a uri"]).await;
    assert!(stderr.contains("invalid target `not a uri`"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_fault_flags_shape_the_built_in_services() {
    let (_serve, lines) = serve(&["--query-outage", "--command-latency-ms", "300"]).await;
    let client = GraphqlClient::new(url(&lines, "GraphiQL"), Duration::from_secs(10));
    let r = client
        .query("{ faults { service outage latencyMs } }")
        .await
        .unwrap();
    assert_eq!(
        r.data()["faults"],
        json!([
            {"service": "COMMAND", "outage": false, "latencyMs": 300},
            {"service": "QUERY", "outage": true, "latencyMs": 0}
        ])
    );
    let r = client
        .query(r#"{ product(id: "p1") { id } }"#)
        .await
        .unwrap();
    assert_eq!(
        r.extension("code"),
        Some(&json!("UNAVAILABLE")),
        "{:?}",
        r.body
    );

    // A rate out of range is refused before anything starts.
    let stderr = refused(&["--query-error-rate", "1.5"]).await;
    assert!(stderr.contains("is 1.5"), "{stderr}");
}
