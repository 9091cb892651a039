//! Shuffle-fetch connections kept for reuse, for the default engine behind the gate.
//!
//! Ballista's own pool type is private in ballista-executor 55.0, so a governed executor that
//! wraps the default engine brings this one: idle connections per (host, port, settings),
//! dropped once idle longer than the executor's `client_ttl`. Eviction happens on every
//! acquire and on the trait's `evict_idle`, so no background task is needed (and the pool can
//! be made outside a Tokio runtime).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ballista_core::client::BallistaClient;
use ballista_core::client_pool::{BallistaClientPool, PooledClient};
use ballista_core::error::Result;
use ballista_core::extension::BallistaConfigGrpcEndpoint;
use ballista_core::utils::GrpcClientConfig;

type Key = (String, u16, GrpcClientConfig);

/// Idle connections by endpoint and settings, newest last.
type Idle = HashMap<Key, Vec<(BallistaClient, Instant)>>;

/// A pool of shuffle-fetch connections.
pub(crate) struct ShuffleClientPool {
    idle: Arc<Mutex<Idle>>,
    ttl: Duration,
}

impl fmt::Debug for ShuffleClientPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShuffleClientPool")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl ShuffleClientPool {
    /// Connections idle longer than `ttl` are closed.
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            idle: Arc::new(Mutex::new(HashMap::new())),
            ttl,
        }
    }

    fn evict(&self, idle: &mut Idle) {
        let now = Instant::now();
        idle.retain(|_, clients| {
            clients.retain(|(_, since)| now.duration_since(*since) <= self.ttl);
            !clients.is_empty()
        });
    }
}

#[async_trait]
impl BallistaClientPool for ShuffleClientPool {
    async fn acquire(
        &self,
        host: &str,
        port: u16,
        config: &GrpcClientConfig,
        customize_endpoint: Option<Arc<BallistaConfigGrpcEndpoint>>,
    ) -> Result<PooledClient> {
        let key: Key = (host.to_owned(), port, config.clone());
        let reused = {
            // A panic elsewhere while holding the lock leaves a map of plain values: usable.
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            self.evict(&mut idle);
            idle.get_mut(&key)
                .and_then(Vec::pop)
                .map(|(client, _)| client)
        };
        let client = match reused {
            Some(client) => client,
            None => {
                BallistaClient::try_new(
                    host,
                    port,
                    config.max_message_size,
                    config.use_tls,
                    customize_endpoint,
                    config.io_retries_times,
                    config.io_retry_wait_time_ms,
                    config.initial_connection_window_size,
                    config.initial_stream_window_size,
                )
                .await?
            }
        };
        let idle = Arc::downgrade(&self.idle);
        Ok(PooledClient::new(
            client,
            Box::new(move |client| {
                // The pool may be gone (executor shutting down): then the connection closes.
                if let Some(idle) = idle.upgrade() {
                    idle.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .entry(key)
                        .or_default()
                        .push((client, Instant::now()));
                }
            }),
        ))
    }

    async fn evict_idle(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        self.evict(&mut idle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> Key {
        ("h".into(), port, GrpcClientConfig::default())
    }

    #[tokio::test]
    async fn idle_connections_past_the_ttl_are_closed_and_fresh_ones_kept() {
        let pool = ShuffleClientPool::new(Duration::from_secs(30));
        {
            let mut idle = pool.idle.lock().unwrap();
            let old = Instant::now().checked_sub(Duration::from_mins(1)).unwrap();
            idle.entry(key(1))
                .or_default()
                .push((BallistaClient::new_for_test("h", 1), old));
            idle.entry(key(2))
                .or_default()
                .push((BallistaClient::new_for_test("h", 2), Instant::now()));
        }
        pool.evict_idle().await;
        let idle = pool.idle.lock().unwrap();
        assert!(!idle.contains_key(&key(1)));
        assert_eq!(idle[&key(2)].len(), 1);
    }
}
