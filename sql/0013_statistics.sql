-- pgqr 0013: statistics that keep up with pgqr's own tables.
--
-- PL/pgSQL keeps each statement's plan for the life of the connection. A plan made while pgqr.instance_state
-- held a few hundred rows joins it by a sequential scan and a hash; after the app adds 10,000 rows, that plan
-- reads every row of instance_state and schedule several times per batch of results, until the next ANALYZE
-- replaces the statistics and with them the cached plans. autovacuum gets there within a minute or two, which
-- is the very minute pgqr is busiest: measured (pgqr bench, service phase, auto_explain), a webhook's write
-- took 9.5 ms of database time instead of about 1, the webhook p99 during that reconcile was 55-85 ms, and the
-- reconcile itself a fifth slower.
--
-- pgqr.analyze_grown() analyzes each of pgqr's tables that has more than doubled in pages since its statistics
-- were taken (a handful of ANALYZEs over a table's whole growth, none while it stays the same size). The tick
-- runs it every minute and each sidecar with its heartbeat, so a bulk import is planned for within seconds.

CREATE FUNCTION pgqr.analyze_grown() RETURNS SETOF regclass
LANGUAGE plpgsql AS $$
DECLARE
    t regclass;
BEGIN
    FOR t IN
        SELECT c.oid::regclass FROM pg_catalog.pg_class c
        WHERE c.relnamespace = 'pgqr'::regnamespace AND c.relkind = 'r'
          -- ANALYZE is the owner's (or a superuser's); any other role would only earn a warning
          AND pg_catalog.pg_has_role(c.relowner, 'USAGE')
          -- relpages is what the last ANALYZE or VACUUM saw (0 before the first); 8 pages is 64 kB
          AND pg_catalog.pg_relation_size(c.oid) / current_setting('block_size')::bigint > 2 * c.relpages + 8
        ORDER BY c.oid
    LOOP
        BEGIN
            -- the lock ANALYZE takes, without waiting: whoever holds it (autovacuum, another tick) is on it
            EXECUTE format('LOCK TABLE %s IN SHARE UPDATE EXCLUSIVE MODE NOWAIT', t);
            EXECUTE format('ANALYZE %s', t);
            RETURN NEXT t;
        EXCEPTION WHEN lock_not_available THEN
            NULL;
        END;
    END LOOP;
END
$$;

-- 0004's tick, and the statistics after the sync (which may just have added the rows).
CREATE OR REPLACE FUNCTION pgqr.tick() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    t pgqr.ticks;
BEGIN
    INSERT INTO pgqr.ticks DEFAULT VALUES RETURNING * INTO t;
    BEGIN
        PERFORM pgqr.sync_instances();
    EXCEPTION WHEN OTHERS THEN
        -- one row pgqr cannot track must not stop the tick (and its NOTIFY) for everyone
        RAISE WARNING 'pgqr: syncing the app''s rows failed (%); the tick goes on', SQLERRM;
    END;
    BEGIN
        PERFORM pgqr.analyze_grown();
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pgqr: refreshing the statistics of pgqr''s tables failed (%); the tick goes on', SQLERRM;
    END;
    PERFORM pg_notify('pgqr_refresh', json_build_object('tick', t.id, 'at', t.at)::text);
    RETURN t.id;
END
$$;
