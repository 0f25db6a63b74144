//! The per-endpoint `grpc.health.v1.Health/Watch` watcher.

use std::sync::Weak;

use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::config::HealthConfig;
use crate::endpoint::EndpointState;
use crate::outlier::Controller;

/// Watches one endpoint until it is removed (the task is aborted) or the
/// channel is dropped.
pub(crate) async fn watch(
    channel: Channel,
    config: HealthConfig,
    ep: Weak<EndpointState>,
    controller: Weak<Controller>,
) {
    let mut backoff = config.retry_backoff();
    loop {
        let mut client = HealthClient::new(channel.clone());
        let request = HealthCheckRequest {
            service: config.service().to_owned(),
        };
        match client.watch(request).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(message)) => {
                            backoff = config.retry_backoff();
                            let (Some(controller), Some(ep)) = (controller.upgrade(), ep.upgrade())
                            else {
                                return;
                            };
                            match ServingStatus::try_from(message.status) {
                                Ok(ServingStatus::Serving) => controller.on_serving(&ep),
                                status => {
                                    tracing::warn!(
                                        endpoint = %ep.key,
                                        service = config.service(),
                                        status = ?status.map(|s| s.as_str_name()).unwrap_or("INVALID"),
                                        "health: endpoint not serving"
                                    );
                                    controller.on_not_serving(&ep);
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%status, "health watch broke");
                            break;
                        }
                    }
                }
            }
            Err(status) if status.code() == Code::Unimplemented => {
                tracing::warn!(
                    service = config.service(),
                    "health: the endpoint does not serve grpc.health.v1; passive detection only"
                );
                if let (Some(controller), Some(ep)) = (controller.upgrade(), ep.upgrade()) {
                    controller.on_watch_broken(&ep);
                }
                return;
            }
            Err(status) => tracing::debug!(%status, "health watch could not start"),
        }
        // The watch is broken: passive detection decides meanwhile.
        match (controller.upgrade(), ep.upgrade()) {
            (Some(controller), Some(ep)) => controller.on_watch_broken(&ep),
            _ => return,
        }
        tokio::time::sleep(backoff).await;
        backoff = backoff.saturating_mul(2).min(config.max_retry_backoff());
    }
}
