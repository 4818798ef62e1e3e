-- A worker's claim on asking Mono for an account's re-auth token. Copies of one re-auth taken by two
-- workers at once (Mono's re-posts, a redelivery) must cost one call: the worker that holds the
-- claim calls, and the others wait until its batch stores the token (then their copies are
-- duplicates) or the claim is released (the call failed) or expires (its worker died mid-call).
CREATE TABLE token_fetch_claims (
    account_id text PRIMARY KEY,
    -- The worker process that holds the claim (one id per process, new at each start).
    holder     uuid NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
