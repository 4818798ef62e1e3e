-- The app's record of each Mono account, and the journal of every webhook delivery the worker settled.

CREATE TABLE accounts (
    -- Mono's account id.
    id                        text PRIMARY KEY,
    -- True while the customer must go through Mono Connect in re-auth mode.
    reauth_required           boolean     NOT NULL DEFAULT false,
    -- Token for connect.reauthorise(token); Mono expires it 10 minutes after issue.
    reauth_token              text,
    reauth_token_issued_at    timestamptz,
    reauth_token_expires_at   timestamptz,
    reauthorized_at           timestamptz,
    -- Last data_status Mono reported (AVAILABLE, PROCESSING, FAILED, PARTIAL, UNAVAILABLE, or new ones).
    data_status               text,
    -- The account as the last applied account_updated described it, and when that was received.
    account_snapshot          jsonb,
    data_updated_at           timestamptz,
    last_sync_failed_at       timestamptz,
    customer_id               text,
    connected_at              timestamptz,
    unlinked_at               timestamptz,
    -- Ordering guards: receive time of the last event applied to the re-auth state and to the data
    -- state. An event received earlier than its guard is stale and changes nothing.
    reauth_state_received_at  timestamptz,
    data_state_received_at    timestamptz,
    created_at                timestamptz NOT NULL DEFAULT now(),
    updated_at                timestamptz NOT NULL DEFAULT now()
);

-- What the app asks at sign-in: which accounts need re-authorisation.
CREATE INDEX accounts_reauth_required_idx ON accounts (updated_at) WHERE reauth_required;

CREATE TABLE webhook_events (
    -- The delivery id ingest stamped (AMQP message_id).
    id            uuid PRIMARY KEY,
    event         text        NOT NULL,
    account_id    text,
    body_sha256   text        NOT NULL,
    received_at   timestamptz NOT NULL,
    status        text        NOT NULL
                  CHECK (status IN ('processed', 'ignored', 'duplicate', 'stale', 'dead')),
    attempts      integer     NOT NULL,
    last_error    text,
    payload       jsonb,
    processed_at  timestamptz
);

-- Duplicate detection: the same body within the dedup window.
CREATE INDEX webhook_events_dedup_idx ON webhook_events (body_sha256, received_at);
-- An account's history, for operators.
CREATE INDEX webhook_events_account_idx ON webhook_events (account_id, received_at);
-- Dead letters, for `worker dlq`.
CREATE INDEX webhook_events_dead_idx ON webhook_events (received_at) WHERE status = 'dead';
