-- Every re-auth token the app's API handed out: which account, when, to which API key, whether it was
-- the stored token or a fresh one from Mono, and until when it works. Answers "who fetched a token
-- for this account" in a security review. The token itself is never recorded here.
CREATE TABLE token_issuances (
    id               bigserial   PRIMARY KEY,
    account_id       text        NOT NULL,
    served_at        timestamptz NOT NULL DEFAULT now(),
    -- The label of the API key that asked (APP_API_KEYS), never the key.
    key_label        text        NOT NULL,
    source           text        NOT NULL CHECK (source IN ('stored', 'fresh')),
    token_issued_at  timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL,
    request_id       text
);

CREATE INDEX token_issuances_account_idx ON token_issuances (account_id, served_at);

-- The app's bulk question, in pages: accounts that need re-auth, in id order (keyset pagination).
CREATE INDEX accounts_reauth_required_id_idx ON accounts (id) WHERE reauth_required;
