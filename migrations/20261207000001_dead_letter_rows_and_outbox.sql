-- Dead letters live in PostgreSQL alone: one row per dead delivery holds the whole message, written
-- in the same transaction as its journal status `dead`. RabbitMQ's `<prefix>.dead` is only a
-- conveyor for what the broker dead-letters by itself, drained into these rows by the worker.
CREATE TABLE dead_letters (
    id                uuid        PRIMARY KEY,          -- the delivery id (AMQP message_id)
    event             text        NOT NULL,
    account_id        text,
    body              bytea       NOT NULL,             -- the body exactly as received
    body_sha256       text        NOT NULL,             -- digest of the body as received (dedup)
    received_at       timestamptz NOT NULL,
    headers           jsonb       NOT NULL DEFAULT '{}', -- string headers carried on by a replay (trace context, lineage)
    reason            text        NOT NULL,
    class             text        NOT NULL CHECK (class IN ('poison', 'permanent', 'exhausted')),
    attempts          integer     NOT NULL,
    first_attempt_at  timestamptz,
    dead_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Taken over from a journal row whose message was not found: the body is the journal's payload,
    -- which may lack fields of the original (JOURNAL_PAYLOAD=minimal). A drained message with the
    -- same id replaces it.
    rebuilt           boolean     NOT NULL DEFAULT false
);
CREATE INDEX dead_letters_dead_at_idx ON dead_letters (dead_at, id);
CREATE INDEX dead_letters_account_idx ON dead_letters (account_id);

-- Every publish an operator causes (a replay's copy; later, notifications to the app) is written
-- here in the transaction that decides it, and published by the worker's relay, which deletes the
-- row only after the broker confirmed the message. A crash leaves the row, never neither.
CREATE TABLE outbox (
    id           bigserial   PRIMARY KEY,
    producer     text        NOT NULL,                  -- who wrote it (`replay`)
    exchange     text        NOT NULL,                  -- '' = the default exchange
    routing_key  text        NOT NULL,
    message_id   text        NOT NULL,
    properties   jsonb       NOT NULL,                  -- timestamp, content type, string headers
    body         bytea       NOT NULL,
    account_id   text,                                  -- for erasure
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX outbox_account_idx ON outbox (account_id);

-- Upgrade: journal rows that say `dead` become dead letters now, with the journal's payload as body
-- (marked rebuilt); the worker's drain of `<prefix>.dead` replaces each with the whole message where
-- the queue still holds it. A row with no payload keeps an empty body and cannot be replayed, only
-- purged.
INSERT INTO dead_letters (id, event, account_id, body, body_sha256, received_at, reason, class, attempts,
                          first_attempt_at, dead_at, rebuilt)
SELECT id, event, account_id, coalesce(convert_to(payload::text, 'UTF8'), ''::bytea), body_sha256, received_at,
       coalesce(last_error, 'dead-lettered by an earlier version'), 'permanent', attempts, first_attempt_at,
       coalesce(processed_at, received_at), true
FROM webhook_events
WHERE status = 'dead'
ON CONFLICT (id) DO NOTHING;
