//! Recording the stored tokens handed out, in batches: concurrent requests' records go into one
//! multi-row insert, and each request answers only once its record is committed. The record stays
//! as durable as one insert per request would make it, at a fraction of the cost per request (one
//! commit and one statement for a whole batch instead of each).

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use crate::errors::ApiError;

/// Most records one insert takes.
const MAX_BATCH: usize = 512;

/// One token handed out.
pub struct IssuanceRecord {
    pub account: String,
    pub key_label: String,
    pub source: &'static str,
    pub token_issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub request_id: String,
}

struct Pending {
    record: IssuanceRecord,
    committed: oneshot::Sender<Result<(), String>>,
}

#[derive(Clone)]
pub struct IssuanceRecorder {
    queue: mpsc::Sender<Pending>,
}

impl IssuanceRecorder {
    /// Starts the writer task; it ends when every recorder clone is dropped.
    pub fn start(pool: PgPool) -> Self {
        let (queue, waiting) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(write_batches(pool, waiting));
        Self { queue }
    }

    /// Records `record`, returning once it is committed.
    pub async fn record(&self, record: IssuanceRecord) -> Result<(), ApiError> {
        let (committed, done) = oneshot::channel();
        let stopped = || ApiError::DatabaseUnavailable("the issuance writer stopped".to_owned());
        self.queue.send(Pending { record, committed }).await.map_err(|_| stopped())?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(ApiError::DatabaseUnavailable(error)),
            Err(_) => Err(stopped()),
        }
    }
}

async fn write_batches(pool: PgPool, mut waiting: mpsc::Receiver<Pending>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while waiting.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let records: Vec<&IssuanceRecord> = batch.iter().map(|p| &p.record).collect();
        let written = insert(&pool, &records).await.map_err(|error| error.to_string());
        if let Err(error) = &written {
            tracing::warn!(%error, records = batch.len(), "recording token issuances failed");
        }
        for pending in batch.drain(..) {
            let _ = pending.committed.send(written.clone());
        }
    }
}

async fn insert(pool: &PgPool, records: &[&IssuanceRecord]) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO token_issuances (account_id, key_label, source, token_issued_at, expires_at, request_id)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::text[])",
    )
    .bind(records.iter().map(|r| r.account.as_str()).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.key_label.as_str()).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.source).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.token_issued_at).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.expires_at).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>())
    .execute(pool)
    .await
    .map(drop)
}
