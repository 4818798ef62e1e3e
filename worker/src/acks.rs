//! Acking deliveries once their outcome is safe, in as few frames as possible.
//!
//! Delivery tags grow on a channel. When every delivery up to a tag is settled, one `multiple` ack
//! covers them all; a settled delivery above one still being worked on (e.g. waiting for Mono) is
//! acked on its own, so a slow delivery never holds back the acks of the others. Sending is
//! serialised: a `multiple` ack must never be overtaken by the single ack of a tag it covers.

use lapin::Channel;
use lapin::options::BasicAckOptions;
use std::collections::BTreeMap;
use std::sync::Mutex;
use uuid::Uuid;

pub struct AckTracker {
    channel: Channel,
    /// Tags received and not yet settled, with their delivery ids.
    outstanding: Mutex<BTreeMap<u64, Uuid>>,
    /// Held while acks are computed and sent.
    sending: tokio::sync::Mutex<()>,
}

impl AckTracker {
    pub fn new(channel: Channel) -> Self {
        Self { channel, outstanding: Mutex::new(BTreeMap::new()), sending: tokio::sync::Mutex::new(()) }
    }

    /// Notes a delivery handed to this worker.
    pub fn received(&self, tag: u64, id: Uuid) {
        self.lock().insert(tag, id);
        self.report();
    }

    /// Delivery ids of the deliveries not settled yet.
    pub fn unsettled_ids(&self) -> Vec<Uuid> {
        self.lock().values().copied().collect()
    }

    /// Deliveries handed out and not yet settled.
    pub fn outstanding(&self) -> usize {
        self.lock().len()
    }

    /// Acks `tags`, whose outcomes are now safe.
    pub async fn settle(&self, tags: &[u64]) {
        if tags.is_empty() {
            return;
        }
        let _sending = self.sending.lock().await;
        let (prefix_end, singles) = {
            let mut outstanding = self.lock();
            for tag in tags {
                outstanding.remove(tag);
            }
            let lowest_open = outstanding.keys().next().copied().unwrap_or(u64::MAX);
            let prefix_end = tags.iter().copied().filter(|t| *t < lowest_open).max();
            let singles: Vec<u64> = tags.iter().copied().filter(|t| *t > lowest_open).collect();
            (prefix_end, singles)
        };
        self.report();
        if let Some(tag) = prefix_end {
            self.send(tag, true).await;
        }
        for tag in singles {
            self.send(tag, false).await;
        }
    }

    async fn send(&self, tag: u64, multiple: bool) {
        if let Err(error) = self.channel.basic_ack(tag, BasicAckOptions { multiple }).await {
            // The session is gone; the broker hands these deliveries out again and the journal
            // recognises them.
            tracing::warn!(%error, tag, "ack failed; the deliveries will be redelivered");
        }
    }

    fn report(&self) {
        metrics::gauge!("monohook_worker_deliveries_in_flight").set(self.outstanding() as f64);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Uuid>> {
        self.outstanding.lock().unwrap_or_else(|e| e.into_inner())
    }
}
