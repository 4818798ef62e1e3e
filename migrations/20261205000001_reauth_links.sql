-- Mono's hosted re-auth links (issue 23): every link Mono created at the api's request, and every
-- time the api handed one out. `ref` is ours, unique, and sent to Mono as `meta.ref`, so a link in
-- Mono's dashboard can be traced to the request that asked for it.
CREATE TABLE reauth_links (
    ref           text        PRIMARY KEY,
    account_id    text        NOT NULL,
    -- The redirect Mono was given (after the allowlist); NULL when none was sent.
    redirect_url  text,
    -- The link itself: a customer's way in until it is used, so only the api reads it (to hand the
    -- same link out again within REAUTH_LINK_REUSE_SECS). Never logged.
    url           text        NOT NULL,
    -- When Mono was asked for it.
    created_at    timestamptz NOT NULL,
    -- The account's re-auth episode when it was asked for (`accounts.reauth_state_received_at`):
    -- a link is handed out again only while the account is still in that episode.
    episode       timestamptz,
    -- The label of the API key whose request made the call (APP_API_KEYS), never the key.
    key_label     text        NOT NULL,
    request_id    text
);

CREATE INDEX reauth_links_account_idx ON reauth_links (account_id, created_at);
CREATE INDEX reauth_links_created_idx ON reauth_links (created_at);

-- Every link handed out: `fresh` (Mono created it for this request or one it shared) or `reused`
-- (created within REAUTH_LINK_REUSE_SECS for the same account, redirect and episode).
CREATE TABLE reauth_link_handouts (
    id          bigserial   PRIMARY KEY,
    ref         text        NOT NULL REFERENCES reauth_links (ref) ON DELETE CASCADE,
    account_id  text        NOT NULL,
    served_at   timestamptz NOT NULL DEFAULT now(),
    key_label   text        NOT NULL,
    source      text        NOT NULL CHECK (source IN ('fresh', 'reused')),
    request_id  text
);

CREATE INDEX reauth_link_handouts_account_idx ON reauth_link_handouts (account_id, served_at);
CREATE INDEX reauth_link_handouts_ref_idx ON reauth_link_handouts (ref);
