-- When the api's last call to Mono for this account's re-auth token (or link) failed. A request of
-- another api process that waited for the account's lock reads it to tell why the lock came free:
-- the holder's call failed (answer as it did, without a second retry budget on one refresh), or the
-- holder went without calling (its client hung up, its lock session ended): then it calls Mono itself.
ALTER TABLE accounts
    ADD COLUMN token_call_failed_at timestamptz,
    ADD COLUMN link_call_failed_at  timestamptz;
