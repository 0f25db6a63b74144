//! The Redis store: keys shared by a fleet of replicas.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use super::{Claim, ClaimToken, Entry, Store};
use crate::error::StoreError;
use crate::record::{Fingerprint, Record};

/// Takes a free key: returns what the key holds, or sets it (with its
/// expiry) and returns nil.
const CLAIM: &str = r"
local held = redis.call('GET', KEYS[1])
if held then return held end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
";

/// Replaces a claim with a record, only while the claim is still ours.
const COMPLETE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// Deletes a claim, only while it is still ours: its value starts with
/// the kind and the token.
const RELEASE: &str = r"
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, 17) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

const IN_PROGRESS: u8 = b'P';
const COMPLETED: u8 = b'D';

/// Keys and responses in Redis, for a fleet of server replicas behind a
/// load balancer: a retry that lands on another replica finds the first
/// one's claim or record.
///
/// Each key is one Redis string, `<prefix><key>` (prefix
/// `idempotency:` by default), with Redis's own expiry (`PX`): the claim's
/// lease, then the record's retention. Claiming, completing and releasing
/// are Lua scripts, so each is atomic: one replica wins a claim, and a
/// replica whose lease ran out cannot overwrite a newer claim. Records are
/// [`Record::encode`]d bytes.
///
/// It talks through a [`ConnectionManager`] (one multiplexed connection,
/// reconnected in the background after a failure). When Redis cannot be
/// reached, calls fail with a [`StoreError`] and the layer does what
/// [`OnStoreError`](crate::OnStoreError) says; the layer also bounds every
/// call with its store timeout.
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    prefix: Arc<str>,
    scripts: Arc<Scripts>,
}

struct Scripts {
    claim: Script,
    complete: Script,
    release: Script,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to the Redis at `url` (`redis://host:port/db`), with a
    /// one-second connection and response timeout.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the URL is invalid or Redis cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = Client::open(url)
            .map_err(|err| StoreError::with_source(format!("invalid Redis URL `{url}`"), err))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|err| {
                StoreError::with_source(format!("cannot connect to Redis at `{url}`"), err)
            })?;
        Ok(Self::new(connection))
    }

    /// A store over a connection you configured.
    pub fn new(connection: ConnectionManager) -> Self {
        RedisStore {
            connection,
            prefix: Arc::from("idempotency:"),
            scripts: Arc::new(Scripts {
                claim: Script::new(CLAIM),
                complete: Script::new(COMPLETE),
                release: Script::new(RELEASE),
            }),
        }
    }

    /// Puts keys under `prefix` instead of `idempotency:` (to share one
    /// Redis between services).
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = Arc::from(prefix);
        self
    }

    fn redis_key(&self, key: &str) -> String {
        let mut out = String::with_capacity(self.prefix.len() + key.len());
        out.push_str(&self.prefix);
        out.push_str(key);
        out
    }
}

fn claim_value(token: ClaimToken, fingerprint: Fingerprint) -> Vec<u8> {
    let mut value = BytesMut::with_capacity(33);
    value.put_u8(IN_PROGRESS);
    value.put_u128(token.as_u128());
    value.put_u128(fingerprint.as_u128());
    value.to_vec()
}

fn millis(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

fn failed(op: &'static str) -> impl FnOnce(redis::RedisError) -> StoreError {
    move |err| StoreError::with_source(format!("Redis `{op}` failed"), err)
}

fn parse(value: &[u8]) -> Result<Entry, StoreError> {
    match value.split_first() {
        Some((&IN_PROGRESS, rest)) if rest.len() == 32 => {
            let mut bits = [0u8; 16];
            bits.copy_from_slice(&rest[16..]);
            Ok(Entry::InProgress {
                fingerprint: Fingerprint::from_u128(u128::from_be_bytes(bits)),
            })
        }
        Some((&COMPLETED, rest)) => Record::decode(rest)
            .map(|record| Entry::Completed(Arc::new(record)))
            .map_err(|err| StoreError::with_source("unreadable idempotency entry in Redis", err)),
        _ => Err(StoreError::new(
            "unreadable idempotency entry in Redis: unknown kind",
        )),
    }
}

/// Releases a claim whose answer never came back.
struct Undo<'a> {
    store: Option<RedisStore>,
    key: &'a str,
    token: ClaimToken,
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        let Some(store) = self.store.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let key = self.key.to_owned();
        let token = self.token;
        runtime.spawn(async move {
            let released = tokio::time::timeout(Duration::from_secs(5), store.release(&key, token)).await;
            if !matches!(released, Ok(Ok(()))) {
                tracing::warn!(key = %key, "could not undo an unanswered claim in Redis; the key stays locked until its lease ends");
            }
        });
    }
}

impl Store for RedisStore {
    async fn claim(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let token = ClaimToken::from_u128(rand::random());
        // If this call is given up (the layer's timeout) or fails after the
        // script was sent, Redis may still run it and hold the key for a
        // whole lease with nobody to complete it: release it then. The
        // release goes on the same connection, after the claim, so Redis
        // runs it after the claim.
        let mut undo = Undo {
            store: Some(self.clone()),
            key,
            token,
        };
        let mut connection = self.connection.clone();
        let held: Option<Vec<u8>> = self
            .scripts
            .claim
            .key(self.redis_key(key))
            .arg(claim_value(token, fingerprint))
            .arg(millis(lease))
            .invoke_async(&mut connection)
            .await
            .map_err(failed("claim"))?;
        undo.store = None;
        match held {
            None => Ok(Claim::Claimed(token)),
            Some(value) => parse(&value).map(Claim::Existing),
        }
    }

    async fn complete(
        &self,
        key: &str,
        token: ClaimToken,
        record: Record,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        let fingerprint = record.fingerprint();
        let encoded = record.encode();
        let mut value = Vec::with_capacity(encoded.len() + 1);
        value.push(COMPLETED);
        value.extend_from_slice(&encoded);
        let mut connection = self.connection.clone();
        let done: i64 = self
            .scripts
            .complete
            .key(self.redis_key(key))
            .arg(claim_value(token, fingerprint))
            .arg(value)
            .arg(millis(retention))
            .invoke_async(&mut connection)
            .await
            .map_err(failed("complete"))?;
        Ok(done == 1)
    }

    async fn release(&self, key: &str, token: ClaimToken) -> Result<(), StoreError> {
        let mut owner = Vec::with_capacity(17);
        owner.push(IN_PROGRESS);
        owner.extend_from_slice(&token.as_u128().to_be_bytes());
        let mut connection = self.connection.clone();
        let _: i64 = self
            .scripts
            .release
            .key(self.redis_key(key))
            .arg(owner)
            .invoke_async(&mut connection)
            .await
            .map_err(failed("release"))?;
        Ok(())
    }

    async fn fetch(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let mut connection = self.connection.clone();
        let held: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.redis_key(key))
            .query_async(&mut connection)
            .await
            .map_err(failed("fetch"))?;
        held.map(|value| parse(&value)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_back_and_garbage_is_an_error() {
        let value = claim_value(ClaimToken::from_u128(5), Fingerprint::from_u128(9));
        assert_eq!(
            parse(&value).unwrap(),
            Entry::InProgress {
                fingerprint: Fingerprint::from_u128(9)
            }
        );
        assert!(parse(b"").is_err());
        assert!(parse(b"Pshort").is_err());
        assert!(
            parse(b"Dnot a record")
                .unwrap_err()
                .to_string()
                .contains("unreadable")
        );
        assert!(parse(b"Xsomething").is_err());
    }
}
