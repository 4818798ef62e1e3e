-- Notifications to the app's backend (Standard Webhooks). The worker writes them in the transaction
-- that changes an account's re-auth state, so a change and its notification commit together; the
-- sender delivers each to every endpoint subscribed to its kind, and deletes the delivery row once
-- the endpoint answered 2xx. This table pair is the notifications' outbox: a row stays until done.

-- Each account's notifications are numbered 1, 2, 3, ... so that the app can drop one that arrives
-- after a newer one.
ALTER TABLE accounts ADD COLUMN notification_seq bigint NOT NULL DEFAULT 0;

CREATE TABLE notifications (
    id          uuid        PRIMARY KEY,                 -- the `webhook-id`, the same on every try
    account_id  text        NOT NULL,
    sequence    bigint      NOT NULL,
    kind        text        NOT NULL,                    -- `account.reauth_required`, ...
    body        bytea       NOT NULL,                    -- exactly the bytes signed and sent
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (account_id, sequence)
);

CREATE TABLE notification_deliveries (
    notification_id  uuid        NOT NULL REFERENCES notifications (id) ON DELETE CASCADE,
    endpoint         text        NOT NULL,               -- the endpoint's name in NOTIFY_ENDPOINTS
    account_id       text        NOT NULL,
    sequence         bigint      NOT NULL,
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- A sender that took the row holds it until then; one killed mid-delivery lets it go by itself.
    leased_until     timestamptz,
    first_attempt_at timestamptz,
    last_error       text,
    PRIMARY KEY (notification_id, endpoint)
);
-- The sender takes, per endpoint and account, only the lowest sequence still to deliver.
CREATE INDEX notification_deliveries_order_idx ON notification_deliveries (endpoint, account_id, sequence);
CREATE INDEX notification_deliveries_due_idx ON notification_deliveries (next_attempt_at);

-- A notification no try delivered becomes a dead letter like a webhook's, listed, replayed and
-- purged by the same tools; `endpoint` says whose it was (null: a webhook from Mono).
ALTER TABLE dead_letters ADD COLUMN endpoint text;
