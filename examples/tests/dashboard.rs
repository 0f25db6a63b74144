//! The dashboard in a real headless browser (Debian's `chromium` and
//! `chromium-driver`, driven over WebDriver): it loads, shows both breakers
//! CLOSED, shows `query` OPEN soon after an outage injected with its
//! button, CLOSED again after recovery, and its reset button closes an
//! open breaker.
//!
//! Without chromium or chromedriver the test fails, naming what is
//! missing, unless `CATALOG_SKIP_BROWSER=1` is set.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use grpc_resilience_examples::catalog::client::GraphqlClient;
use grpc_resilience_examples::catalog::system::{System, SystemOptions};
use serde_json::json;
use tokio::time::{Instant, sleep};

const CHROMIUM: &[&str] = &["/usr/bin/chromium", "/usr/bin/chromium-browser"];
const CHROMEDRIVER: &[&str] = &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"];

fn find(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

/// chromedriver, started in a process group of its own and killed with
/// that group (so the browser it started goes too, even when the test
/// fails before the session is closed); and the browser's profile
/// directory, removed.
struct Driver {
    child: Child,
    profile: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The group's id is chromedriver's PID.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn start_driver(chromedriver: &Path) -> (Driver, String) {
    let port = free_port();
    let child = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
    let profile = std::env::temp_dir().join(format!(
        "catalog-dashboard-test-{}-{port}",
        std::process::id()
    ));
    let driver = Driver { child, profile };
    let url = format!("http://127.0.0.1:{port}");
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return (driver, url);
        }
        assert!(
            Instant::now() < end,
            "chromedriver did not listen within 15 s"
        );
        sleep(Duration::from_millis(100)).await;
    }
}

async fn browser(driver_url: &str, chromium: &Path, profile: &Path) -> Client {
    let args = [
        "--headless".to_owned(),
        "--no-sandbox".to_owned(),
        "--disable-gpu".to_owned(),
        "--disable-dev-shm-usage".to_owned(),
        "--disable-quic".to_owned(),
        "--no-first-run".to_owned(),
        "--disable-background-networking".to_owned(),
        "--disable-component-update".to_owned(),
        "--disable-sync".to_owned(),
        "--window-size=1280,900".to_owned(),
        format!("--user-data-dir={}", profile.display()),
    ];
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"binary": chromium.display().to_string(), "args": args}),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(driver_url)
        .await
        .expect("a WebDriver session with headless chromium")
}

async fn text(client: &Client, id: &str) -> String {
    match client.find(Locator::Id(id)).await {
        Ok(element) => element.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Waits until the element `id` shows `want`, checking every 100 ms for
/// at most `within`.
async fn wait_for_text(client: &Client, id: &str, want: &str, within: Duration) {
    let end = Instant::now() + within;
    let mut seen = String::new();
    while Instant::now() < end {
        seen = text(client, id).await;
        if seen == want {
            return;
        }
        sleep(Duration::from_millis(100)).await;
    }
    panic!("#{id} showed {seen:?}, not {want:?}, after {within:?}");
}

async fn click(client: &Client, id: &str) {
    client
        .find(Locator::Id(id))
        .await
        .unwrap_or_else(|e| panic!("no #{id}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("cannot click #{id}: {e}"));
}

/// Read traffic through the gateway until `stop` (at most 90 s, one call
/// per 20 ms), so the breakers have calls to judge.
fn traffic(graphql: GraphqlClient, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let end = Instant::now() + Duration::from_secs(90);
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            let _ = graphql.query(r#"{ product(id: "p2") { id } }"#).await;
            sleep(Duration::from_millis(20)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_breakers_open_and_close_in_a_real_browser() {
    let skip = std::env::var("CATALOG_SKIP_BROWSER").is_ok_and(|v| v == "1");
    let (chromium, chromedriver) = match (find(CHROMIUM), find(CHROMEDRIVER)) {
        (Some(c), Some(d)) => (c, d),
        (c, d) if skip => {
            eprintln!("skipped (CATALOG_SKIP_BROWSER=1): chromium {c:?}, chromedriver {d:?}");
            return;
        }
        (c, d) => panic!(
            "the dashboard test needs Debian's chromium and chromium-driver \
             (`apt-get install -y chromium chromium-driver`; .ci/run installs them): \
             chromium found: {c:?}, chromedriver found: {d:?}. \
             Set CATALOG_SKIP_BROWSER=1 to skip it."
        ),
    };
    if skip {
        eprintln!("skipped (CATALOG_SKIP_BROWSER=1)");
        return;
    }

    let system = System::start(SystemOptions::default())
        .await
        .expect("the system starts");
    let graphql = GraphqlClient::new(system.graphql_url(), Duration::from_secs(10));
    let (driver, driver_url) = start_driver(&chromedriver).await;
    let client = browser(&driver_url, &chromium, &driver.profile).await;
    client
        .goto(&system.url())
        .await
        .expect("the dashboard loads");
    assert_eq!(
        client.title().await.unwrap(),
        "Catalog gateway: circuit breakers"
    );

    // Both breakers CLOSED.
    wait_for_text(&client, "state-command", "CLOSED", Duration::from_secs(10)).await;
    wait_for_text(&client, "state-query", "CLOSED", Duration::from_secs(10)).await;

    // An outage injected with the page's button opens `query`.
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(graphql.clone(), stop.clone());
    click(&client, "outage-query").await;
    wait_for_text(
        &client,
        "outage-query",
        "Outage off",
        Duration::from_secs(5),
    )
    .await;
    wait_for_text(&client, "state-query", "OPEN", Duration::from_secs(10)).await;
    assert_eq!(text(&client, "state-command").await, "CLOSED");
    // The down service's health service says so.
    wait_for_text(
        &client,
        "health-query",
        "health: NOT_SERVING",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(text(&client, "health-command").await, "health: SERVING");

    // The outage ends: HALF_OPEN probes close it again.
    click(&client, "outage-query").await;
    wait_for_text(
        &client,
        "health-query",
        "health: SERVING",
        Duration::from_secs(5),
    )
    .await;
    wait_for_text(&client, "state-query", "CLOSED", Duration::from_secs(15)).await;
    let log = text(&client, "transitions").await;
    assert!(log.contains("query: CLOSED → OPEN"), "{log}");
    assert!(log.contains("query: HALF_OPEN → CLOSED"), "{log}");

    // Open it again, stop the traffic, and close it with the reset button.
    click(&client, "outage-query").await;
    wait_for_text(&client, "state-query", "OPEN", Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.expect("the traffic task ends");
    click(&client, "reset-all").await;
    wait_for_text(&client, "state-query", "CLOSED", Duration::from_secs(5)).await;
    let r = graphql
        .query("{ circuitBreakers { name state } }")
        .await
        .unwrap();
    assert_eq!(
        r.data()["circuitBreakers"],
        json!([{"name": "command", "state": "CLOSED"}, {"name": "query", "state": "CLOSED"}])
    );

    if let Ok(png) = client.screenshot().await {
        let _ = std::fs::write(std::env::temp_dir().join("catalog-dashboard.png"), png);
    }
    client.close().await.expect("the session ends");
    drop(driver);
}
