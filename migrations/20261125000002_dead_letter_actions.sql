-- When a delivery was first attempted, for `worker dlq list` (set when it is dead-lettered).
ALTER TABLE webhook_events ADD COLUMN first_attempt_at timestamptz;

-- Every replay and purge of a dead letter: who did what, when, and why. A row is written before the
-- dead-letter queue is touched and completed after, so an interrupted run is finished by the next
-- one instead of losing or repeating a message.
CREATE TABLE dead_letter_actions (
    id            bigserial PRIMARY KEY,
    batch_id      uuid        NOT NULL,
    action        text        NOT NULL CHECK (action IN ('replay', 'purge')),
    delivery_id   uuid        NOT NULL,
    event         text        NOT NULL,
    account_id    text,
    reason        text,
    attempts      integer     NOT NULL,
    dead_at       timestamptz,
    actor         text        NOT NULL,
    note          text,
    forced        boolean     NOT NULL DEFAULT false,
    started_at    timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz
);

CREATE INDEX dead_letter_actions_pending_idx ON dead_letter_actions (delivery_id) WHERE completed_at IS NULL;
CREATE INDEX dead_letter_actions_started_idx ON dead_letter_actions (started_at);
