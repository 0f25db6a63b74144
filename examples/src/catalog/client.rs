//! A small GraphQL-over-HTTP client for the demo and the tests.

use std::fmt;
use std::time::Duration;

use serde_json::{Value, json};

/// Posts GraphQL requests to one endpoint.
#[derive(Clone, Debug)]
pub struct GraphqlClient {
    http: reqwest::Client,
    url: String,
}

/// A request that got no GraphQL response (connection refused, timeout,
/// not JSON).
#[derive(Debug)]
pub struct ClientError(pub String);

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ClientError {}

/// A GraphQL response: `data` and the first error, if any.
#[derive(Clone, Debug)]
pub struct Response {
    /// The whole response body.
    pub body: Value,
}

impl Response {
    /// `data`, or `Value::Null`.
    pub fn data(&self) -> &Value {
        &self.body["data"]
    }

    /// The first error, if any.
    pub fn error(&self) -> Option<&Value> {
        self.body["errors"].as_array().and_then(|e| e.first())
    }

    /// The first error's extension `name`.
    pub fn extension(&self, name: &str) -> Option<&Value> {
        self.error().map(|e| &e["extensions"][name])
    }
}

impl GraphqlClient {
    /// A client of the endpoint at `url`; every request gives up after
    /// `timeout`.
    pub fn new(url: impl Into<String>, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .no_proxy()
            .build()
            .unwrap_or_default();
        GraphqlClient {
            http,
            url: url.into(),
        }
    }

    /// Runs `query` with `variables`.
    ///
    /// # Errors
    ///
    /// [`ClientError`] if no GraphQL response came back.
    pub async fn execute(&self, query: &str, variables: Value) -> Result<Response, ClientError> {
        let response = self
            .http
            .post(&self.url)
            .json(&json!({ "query": query, "variables": variables }))
            .send()
            .await
            .map_err(|e| ClientError(format!("POST {}: {e}", self.url)))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .map_err(|e| ClientError(format!("POST {}: HTTP {status}, not JSON: {e}", self.url)))?;
        Ok(Response { body })
    }

    /// Runs `query` without variables.
    ///
    /// # Errors
    ///
    /// [`ClientError`] if no GraphQL response came back.
    pub async fn query(&self, query: &str) -> Result<Response, ClientError> {
        self.execute(query, Value::Null).await
    }
}
