//! Acking deliveries once their outcome is safe, in as few frames as possible.
//!
//! Delivery tags grow on a channel. When every delivery up to a tag is settled, one `multiple` ack
//! covers them all; a settled delivery above one still being worked on (e.g. waiting for Mono) is
//! acked on its own, so a slow delivery never holds back the acks of the others. Sending is
//! serialised: a `multiple` ack must never be overtaken by the single ack of a tag it covers.

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use std::collections::BTreeSet;
use std::sync::Mutex;

pub struct AckTracker {
    channel: Channel,
    /// Tags received and not yet settled.
    outstanding: Mutex<BTreeSet<u64>>,
    /// Held while acks are computed and sent.
    sending: tokio::sync::Mutex<()>,
}

impl AckTracker {
    pub fn new(channel: Channel) -> Self {
        Self { channel, outstanding: Mutex::new(BTreeSet::new()), sending: tokio::sync::Mutex::new(()) }
    }

    /// Notes a delivery handed to this worker.
    pub fn received(&self, tag: u64) {
        self.lock().insert(tag);
        self.report();
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
            let lowest_open = outstanding.first().copied().unwrap_or(u64::MAX);
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

    /// Returns a delivery to the queue (its copy could not be moved where it belongs). The broker
    /// counts the return against the delivery limit, so a copy that can never move ends as poison
    /// instead of circling forever.
    pub async fn requeue(&self, tag: u64) {
        let _sending = self.sending.lock().await;
        self.lock().remove(&tag);
        self.report();
        let options = BasicNackOptions { multiple: false, requeue: true };
        if let Err(error) = self.channel.basic_nack(tag, options).await {
            tracing::warn!(%error, tag, "nack failed; the delivery will be redelivered");
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

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        self.outstanding.lock().unwrap_or_else(|e| e.into_inner())
    }
}
