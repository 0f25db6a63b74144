//! Reloading a config file through real stubs; the polling watcher.

use catalog_proto::GetProductRequest;
use catalog_proto::query_service_client::QueryServiceClient;
use grpc_fault::Fault;
use grpc_resilience::{ResilienceConfig, ResilientChannel};
use grpc_resilience_tests::TestServer;
use tonic::Code;

fn get() -> GetProductRequest {
    GetProductRequest { id: "p1".into() }
}

fn file(attempts: u32) -> String {
    // A breaker that stays closed: this test counts attempts.
    format!(
        "[retry.default]\nmax_attempts = {attempts}\ninitial_delay = 1\nmax_delay = 1\n\
         [circuit_breakers.query]\nfailure_threshold = 1000\n"
    )
}

fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "grpc-resilience-{}-{name}.toml",
        std::process::id()
    ))
}

#[tokio::test]
async fn reload_file_applies_a_good_file_and_rejects_a_bad_one_whole() {
    let server = TestServer::start().await;
    server
        .faults
        .always("GetProduct", Fault::status(Code::Unavailable))
        .unwrap();
    let path = temp_path("once");
    std::fs::write(&path, file(2)).unwrap();
    let config = ResilienceConfig::from_file(&path).unwrap();
    let channel = ResilientChannel::new(server.channel(), &config).unwrap();
    let mut client = QueryServiceClient::new(channel.clone());

    client.get_product(get()).await.unwrap_err();
    assert_eq!(server.faults.stats("GetProduct").unwrap().calls, 2);

    std::fs::write(&path, file(4)).unwrap();
    channel.reload_file(&path).unwrap();
    client.get_product(get()).await.unwrap_err();
    assert_eq!(server.faults.stats("GetProduct").unwrap().calls, 2 + 4);

    std::fs::write(&path, "[retry.default]\nmax_attempts = 5\nmultiplier = -1\n[circuit_breakers.query]\nfailure_threshold = 1000\n").unwrap();
    let err = channel.reload_file(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}:3: retry.default.multiplier = -1: must be a finite number above 0",
            path.display()
        )
    );
    client.get_product(get()).await.unwrap_err();
    assert_eq!(
        server.faults.stats("GetProduct").unwrap().calls,
        2 + 4 + 4,
        "the old config stays"
    );
    let _ = std::fs::remove_file(&path);
}

#[cfg(feature = "watch")]
#[tokio::test]
async fn the_watcher_reloads_a_changed_file_and_keeps_the_old_config_on_a_bad_one() {
    let server = TestServer::start().await;
    server
        .faults
        .always("GetProduct", Fault::status(Code::Unavailable))
        .unwrap();
    let path = temp_path("watch");
    std::fs::write(&path, file(2)).unwrap();
    let config = ResilienceConfig::from_file(&path).unwrap();
    let channel = ResilientChannel::new(server.channel(), &config).unwrap();
    use grpc_resilience_tests::eventually;
    use std::time::Duration;
    let watcher = channel.watch_file(&path, Duration::from_millis(20));
    let mut client = QueryServiceClient::new(channel.clone());

    std::fs::write(&path, "[retry.default]\nmax_attempts = \"many\"\n[circuit_breakers.query]\nfailure_threshold = 1000\n").unwrap();
    assert!(eventually(Duration::from_secs(10), || watcher.last_error().is_some()).await);
    assert!(
        watcher
            .last_error()
            .unwrap()
            .to_string()
            .contains("retry.default.max_attempts")
    );
    assert_eq!(watcher.reloads(), 0);
    client.get_product(get()).await.unwrap_err();
    assert_eq!(server.faults.stats("GetProduct").unwrap().calls, 2);

    std::fs::write(&path, file(3)).unwrap();
    assert!(eventually(Duration::from_secs(10), || watcher.reloads() == 1).await);
    assert!(watcher.last_error().is_none());
    client.get_product(get()).await.unwrap_err();
    assert_eq!(server.faults.stats("GetProduct").unwrap().calls, 2 + 3);
    drop(watcher);
    let _ = std::fs::remove_file(&path);
}
