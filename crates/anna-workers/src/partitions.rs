//! What serving a partition of the sessions means for this process: a consumer of the
//! partition's command stream, and the live connections of its sessions. The fleet
//! ([`crate::fleet`]) starts and stops partitions through [`SessionPartitions`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anna_store::Store;
use anna_streams::Stream;
use anna_streams::consumer::{ConsumerConfig, EventConsumer, Subscriber};
use anna_usecases::SessionsConfig;
use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::fleet::PartitionWork;
use crate::sessions::{SessionCommands, SessionsWorker};

/// How long stopping a partition waits for its commands in flight.
const STOP_WAIT: Duration = Duration::from_secs(30);

struct Running {
    stop: CancellationToken,
    consumer: JoinHandle<()>,
}

pub struct SessionPartitions {
    worker: Arc<SessionsWorker>,
    store: Arc<dyn Store>,
    stream: Arc<dyn Stream>,
    /// The command consumer's settings; stream and consumer name are set per partition.
    consumer: ConsumerConfig,
    sessions: SessionsConfig,
    running: Mutex<HashMap<u32, Running>>,
}

impl SessionPartitions {
    pub fn new(
        worker: Arc<SessionsWorker>,
        store: Arc<dyn Store>,
        stream: Arc<dyn Stream>,
        consumer: ConsumerConfig,
        sessions: SessionsConfig,
    ) -> Self {
        Self { worker, store, stream, consumer, sessions, running: Mutex::new(HashMap::new()) }
    }

    fn consumer_of(&self, partition: u32) -> EventConsumer {
        let mut config = self.consumer.clone();
        config.stream = self.sessions.stream_of_partition(partition);
        config.consumer = format!("{}-p{partition}", self.consumer.consumer);
        let subscriber: Arc<dyn Subscriber> = Arc::new(SessionCommands(self.worker.clone()));
        EventConsumer::new(self.store.clone(), self.stream.clone(), config).subscribe(subscriber)
    }

    /// Takes the partitions' consumers out of the running set and tells them to stop.
    async fn signal_stop(&self, partitions: &[u32]) -> Vec<JoinHandle<()>> {
        let mut running = self.running.lock().await;
        partitions
            .iter()
            .filter_map(|p| running.remove(p))
            .map(|r| {
                r.stop.cancel();
                r.consumer
            })
            .collect()
    }
}

#[async_trait]
impl PartitionWork for SessionPartitions {
    async fn start(&self, partitions: &[u32]) {
        {
            let mut running = self.running.lock().await;
            for &partition in partitions {
                if running.contains_key(&partition) {
                    continue;
                }
                let stop = CancellationToken::new();
                let consumer = Arc::new(self.consumer_of(partition));
                let handle = tokio::spawn(consumer.run(stop.clone()));
                running.insert(partition, Running { stop, consumer: handle });
            }
        }
        match self.worker.resume_partitions(partitions).await {
            Ok(queued) => tracing::info!(?partitions, queued, "sessions of acquired partitions queued for resuming"),
            Err(error) => {
                // Tried again in the background (the next partition work must not wait), for
                // as long as any of them is still held here.
                tracing::warn!(?partitions, %error, "sessions of acquired partitions could not be listed; retrying");
                let (worker, partitions) = (self.worker.clone(), partitions.to_vec());
                tokio::spawn(async move {
                    let mut delay = Duration::from_secs(1);
                    loop {
                        tokio::time::sleep(delay).await;
                        let held: Vec<u32> =
                            partitions.iter().copied().filter(|p| worker.holds_partition(*p)).collect();
                        if held.is_empty() {
                            return;
                        }
                        match worker.resume_partitions(&held).await {
                            Ok(queued) => {
                                tracing::info!(partitions = ?held, queued, "sessions of acquired partitions queued for resuming");
                                return;
                            }
                            Err(error) => tracing::warn!(partitions = ?held, %error, "sessions still cannot be listed"),
                        }
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                });
            }
        }
    }

    async fn stop(&self, partitions: &[u32]) {
        // Commands in flight finish (and are acknowledged) while the connections are still
        // there, then the connections close.
        let consumers = self.signal_stop(partitions).await;
        if tokio::time::timeout(STOP_WAIT, futures::future::join_all(consumers)).await.is_err() {
            tracing::warn!(?partitions, "session commands still running after 30 s; stopping their partitions anyway");
        }
        self.worker.close_partitions(Some(partitions)).await;
    }

    async fn abandon(&self, partitions: &[u32]) {
        // The connections first: they are what must not run on two workers at once.
        self.worker.close_partitions(Some(partitions)).await;
        let consumers = self.signal_stop(partitions).await;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(STOP_WAIT, futures::future::join_all(consumers)).await;
        });
    }
}
