-- Keeping personal data only as long as needed (issue 22): who erased which account's personal data,
-- and the indexes that let retention delete old rows in bounded steps.

-- Every `worker account erase`: which account, who asked, why, and what was removed. Holds no
-- personal data itself (an account id, an operator's name, their note, counts).
CREATE TABLE account_erasures (
    id          bigserial   PRIMARY KEY,
    account_id  text        NOT NULL,
    actor       text        NOT NULL,
    reason      text        NOT NULL,
    -- What the erasure found and removed: {"reauth_token": bool, "account_snapshot": bool, ...}.
    removed     jsonb       NOT NULL,
    erased_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX account_erasures_account_idx ON account_erasures (account_id, erased_at);
CREATE INDEX account_erasures_erased_idx ON account_erasures (erased_at);

-- Retention finds the oldest journal rows and audit rows by time; without these each bounded step
-- would scan the whole table.
CREATE INDEX webhook_events_received_idx ON webhook_events (received_at);
CREATE INDEX token_issuances_served_idx ON token_issuances (served_at);
