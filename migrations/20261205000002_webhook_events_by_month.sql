-- no-transaction
-- The journal, range-partitioned on `id` by month (issue 22, point 4), so that retention drops a
-- month's rows with its partition instead of deleting them one by one. Delivery ids are UUIDv7
-- (ingest stamps them): their first 48 bits are the receive time in Unix milliseconds, so a month
-- is the id range [lowest id of its first millisecond, lowest id of the next month's).
--
-- An existing journal is converted in place, without copying it:
--   1. beside it, the partitioned table (same columns, constraints and indexes), its DEFAULT
--      partition and its first months, from the boundary B = the first day of next month (of the
--      month after if next month is less than 7 days away); on the old table, CHECK (id < B)
--      NOT VALID: no scan, and from now on no row at or above B can be written there;
--   2. the old table's rows at or above B (ids ingest did not stamp, e.g. derived from a body, or
--      inserted by hand) move to the new table, which routes them to their month or the default;
--   3. VALIDATE the check: the one long step, a scan that only takes SHARE UPDATE EXCLUSIVE, so the
--      worker keeps reading and writing the old table meanwhile;
--   4. in one short transaction: the old table is renamed `webhook_events_before`, the new one
--      takes its name, and the old table is attached as the partition [MINVALUE, B). The validated
--      check proves the partition's bound, so ATTACH does not scan it; its indexes are attached
--      as they are, not built again.
-- Ingest never touches PostgreSQL. The worker waits at most for steps 1, 2 and 4 (short locks);
-- rows moved in step 2 are out of its sight until step 4 (there are none from ingest). Steps 1 and
-- 4 take ACCESS EXCLUSIVE on the journal: each waits at most 5 s for it (lock_timeout), so that a
-- long reader (a dump, a report) fails the migration, to be run again, instead of queueing every
-- worker statement behind the wait. Between steps 1 and 4 a row the check refuses (an id at or
-- above B) is our fault, not the event's: the worker parks its delivery until the swap.
-- Each step is its own transaction and first looks at what is done already, so a run interrupted
-- midway is finished by running `worker migrate` again. The worker creates later months ahead and
-- drops expired ones (`worker/src/partitions.rs`).

-- The lowest UUIDv7 of the millisecond `at`: the bound of a month's partition.
CREATE OR REPLACE FUNCTION journal_id_floor(at timestamptz) RETURNS uuid
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT (lpad(to_hex(floor(extract(epoch FROM at) * 1000)::bigint), 12, '0')
                  || '00000000000000000000')::uuid $$;

-- 1. The partitioned table beside the old one, and the old table's bound (not checked yet).
BEGIN;
SET LOCAL lock_timeout = '5s';
-- Months are UTC months (as the worker makes them); adding a month in a zone with summer time
-- would move a bound by an hour.
SET LOCAL TimeZone = 'UTC';
DO $$
DECLARE
    boundary timestamptz := date_trunc('month', now() + interval '7 days', 'UTC') + interval '1 month';
    month timestamptz;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'webhook_events'::regclass) = 'p'
        OR to_regclass('webhook_events_by_month') IS NOT NULL THEN
        RETURN;
    END IF;
    CREATE TABLE webhook_events_by_month (LIKE webhook_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
        PARTITION BY RANGE (id);
    ALTER TABLE webhook_events_by_month ADD CONSTRAINT webhook_events_by_month_pkey PRIMARY KEY (id);
    CREATE INDEX webhook_events_by_month_dedup_idx ON webhook_events_by_month (body_sha256, received_at);
    CREATE INDEX webhook_events_by_month_account_idx ON webhook_events_by_month (account_id, received_at);
    CREATE INDEX webhook_events_by_month_dead_idx ON webhook_events_by_month (received_at)
        WHERE status = 'dead';
    CREATE INDEX webhook_events_by_month_received_idx ON webhook_events_by_month (received_at);
    -- Ids no month holds (not UUIDv7, or a month not created yet): kept small, since creating a
    -- month looks through it.
    CREATE TABLE webhook_events_default PARTITION OF webhook_events_by_month DEFAULT;
    FOREACH month IN ARRAY ARRAY[boundary, boundary + interval '1 month'] LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF webhook_events_by_month FOR VALUES FROM (%L) TO (%L)',
                       'webhook_events_' || to_char(month AT TIME ZONE 'UTC', 'YYYY_MM'),
                       journal_id_floor(month), journal_id_floor(month + interval '1 month'));
    END LOOP;
    EXECUTE format('ALTER TABLE webhook_events ADD CONSTRAINT webhook_events_before_bound CHECK (id < %L::uuid) NOT VALID',
                   journal_id_floor(boundary));
END $$;
COMMIT;

-- 2. The old table's rows at or above the boundary move to the new table.
BEGIN;
DO $$
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'webhook_events'::regclass) = 'p' THEN
        RETURN;
    END IF;
    WITH moved AS (
        DELETE FROM webhook_events
        WHERE id >= (SELECT substring(pg_get_constraintdef(oid) FROM '''([0-9a-f-]{36})''')::uuid
                     FROM pg_constraint
                     WHERE conrelid = 'webhook_events'::regclass AND conname = 'webhook_events_before_bound')
        RETURNING *)
    INSERT INTO webhook_events_by_month SELECT * FROM moved;
END $$;
COMMIT;

-- 3. Every old row is below the boundary: checked while the worker goes on.
BEGIN;
DO $$
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'webhook_events'::regclass) = 'r' THEN
        ALTER TABLE webhook_events VALIDATE CONSTRAINT webhook_events_before_bound;
    END IF;
END $$;
COMMIT;

-- 4. The swap, in one short transaction.
BEGIN;
SET LOCAL lock_timeout = '5s';
DO $$
DECLARE
    boundary uuid;
    suffix text;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'webhook_events'::regclass) = 'p' THEN
        RETURN;
    END IF;
    LOCK TABLE webhook_events IN ACCESS EXCLUSIVE MODE;
    SELECT substring(pg_get_constraintdef(oid) FROM '''([0-9a-f-]{36})''')::uuid INTO boundary
    FROM pg_constraint
    WHERE conrelid = 'webhook_events'::regclass AND conname = 'webhook_events_before_bound';
    ALTER TABLE webhook_events RENAME TO webhook_events_before;
    ALTER TABLE webhook_events_by_month RENAME TO webhook_events;
    -- The parent's indexes (and primary key) keep the names queries and error handling know.
    FOREACH suffix IN ARRAY ARRAY['pkey', 'dedup_idx', 'account_idx', 'dead_idx', 'received_idx'] LOOP
        EXECUTE format('ALTER INDEX %I RENAME TO %I', 'webhook_events_' || suffix, 'webhook_events_before_' || suffix);
        EXECUTE format('ALTER INDEX %I RENAME TO %I', 'webhook_events_by_month_' || suffix, 'webhook_events_' || suffix);
    END LOOP;
    EXECUTE format('ALTER TABLE webhook_events ATTACH PARTITION webhook_events_before FOR VALUES FROM (MINVALUE) TO (%L)',
                   boundary);
    -- The partition's bound says the same from now on.
    ALTER TABLE webhook_events_before DROP CONSTRAINT webhook_events_before_bound;
END $$;
COMMIT;
