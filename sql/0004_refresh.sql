-- pgqr 0004: the refresh engine in SQL: the tick, claims, the schedule that follows each QR's life, and the one
-- write path for polls and webhooks.
--
-- The rows are the truth; NOTIFY pgqr_refresh is only a wake-up. Listeners claim due instances under a lease
-- (only as many as they have free call slots), commit, call Evolution, and hand results back in small batches
-- to pgqr.record_results(), which also sets each instance's next due time.

-- Run by the pg_cron job pgqr-tick every minute: the safety net under the listeners' own due-time wake-ups.
CREATE FUNCTION pgqr.tick() RETURNS bigint
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
    PERFORM pg_notify('pgqr_refresh', json_build_object('tick', t.id, 'at', t.at)::text);
    RETURN t.id;
END
$$;

-- Lease up to max_rows instances due by `due_by` to `claim_owner` for `lease`, earliest due first, and return
-- what calling Evolution for them takes (the token only ever goes into the apikey header). Rows the app has
-- moved out of waiting without pgqr's trigger (triggers off) are put to rest instead. Run it in its own short
-- transaction and commit before any HTTP call; SKIP LOCKED and the lease keep replicas apart.
CREATE FUNCTION pgqr.claim(claim_owner text, max_rows integer, lease interval, due_by timestamptz DEFAULT now())
RETURNS TABLE (key text, name text, token text, url text, phone text, qr_md5 text, claimed_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    keys text[];
BEGIN
    keys := ARRAY(
        SELECT s.key FROM pgqr.instance_state s
        WHERE s.waiting AND s.due_at <= due_by AND (s.lease_expires_at IS NULL OR s.lease_expires_at <= now())
        ORDER BY s.due_at
        LIMIT greatest(max_rows, 0)
        FOR UPDATE OF s SKIP LOCKED);
    IF cardinality(keys) = 0 THEN
        RETURN;
    END IF;
    UPDATE pgqr.instance_state s SET waiting = false, due_at = NULL
     WHERE s.key = ANY(keys)
       AND NOT EXISTS (SELECT 1 FROM pgqr.app_rows(keys) a WHERE a.key = s.key AND a.waiting);
    RETURN QUERY
    UPDATE pgqr.instance_state s
       SET lease_owner = claim_owner, lease_expires_at = now() + lease, last_attempt_at = now()
      FROM pgqr.app_rows(keys) a
     WHERE s.key = a.key AND a.waiting
    RETURNING s.key, a.name, a.token, a.url, a.phone, s.qr_md5, now();
END
$$;

-- Seconds until the earliest instance falls due (0: one is due now), NULL when none waits: how long a
-- listener may sleep before claiming again.
CREATE FUNCTION pgqr.next_due_in() RETURNS float8
LANGUAGE sql STABLE AS $$
    SELECT greatest(extract(epoch FROM min(greatest(s.due_at, coalesce(s.lease_expires_at, s.due_at))) - now()), 0)::float8
    FROM pgqr.instance_state s WHERE s.waiting
    -- greatest() skips NULLs: without this, "nothing due ever" would read as 0 and the engine would spin
    HAVING min(s.due_at) IS NOT NULL
$$;

-- One result, as the listener (poll) or the webhook receiver hands it over. md5 is the QR image's md5; qr is the
-- image itself, sent only when it differs from what the claim returned. started_at: when the poll's call
-- started (its latency_ms later the reply came). evolution_state: open | connecting | close, when known.
CREATE TYPE pgqr.result AS (
    key text, source pgqr.source, outcome pgqr.outcome, md5 text, qr text, pairing_code text, qr_count integer,
    http_status integer, latency_ms real, error_class text, started_at timestamptz, evolution_state text,
    final boolean);

-- What one result changes in an instance's schedule and QR estimate.
CREATE TYPE pgqr.plan AS (changed boolean, due_at timestamptz, qr_born_after timestamptz, qr_seen_at timestamptz,
                          qr_expires_at timestamptz, repeats integer);

-- The schedule that follows the QR's life (the engine's rules, in one place).
--   A new image was made between the last poll that did not return it and the reply that did (a webhook
--   brings it as it is made; a connect slow enough to have gone through Evolution's close branch made it
--   during the call). It expires one lifetime after that, so the next poll is due just after the earliest
--   possible expiry. A poll that still returns the same image narrows the estimate (the image was current
--   then) and retries soon, half the remaining window at a time, within [retry_min, retry_max]: after a few
--   rotations the window in which a rotation can hide is a second or two. Only a fast reply proves Evolution
--   answered from memory (state connecting); a slow one that returns the same image went through its close
--   branch, which opens a socket each time: that is polled at the slow, doubling close cadence.
--   A QR brought by webhook moves the next poll out to the slow safety cadence: webhooks bring the next.
CREATE FUNCTION pgqr.plan_next(s pgqr.instance_state, r pgqr.result) RETURNS pgqr.plan
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    p     pgqr.plan;
    life  interval := pgqr.seconds('qr_lifetime_seconds');
    rmin  interval := pgqr.seconds('retry_min_seconds');
    rmax  interval := pgqr.seconds('retry_max_seconds');
    seen  timestamptz := CASE WHEN r.source = 'poll'
                              THEN r.started_at + make_interval(secs => coalesce(r.latency_ms, 0) / 1000.0)
                              ELSE now() END;
    slow  boolean := coalesce(r.latency_ms >= pgqr.setting('slow_connect_ms')::float8, false);
    close_cadence interval;
BEGIN
    p := ROW(false, s.due_at, s.qr_born_after, s.qr_seen_at, s.qr_expires_at,
             CASE WHEN s.last_outcome IS NOT DISTINCT FROM r.outcome THEN s.repeats + 1 ELSE 0 END)::pgqr.plan;
    close_cadence := least(pgqr.seconds('close_poll_seconds') * 2 ^ least(p.repeats, 20),
                           pgqr.seconds('close_poll_max_seconds'));
    CASE r.outcome
    WHEN 'qr' THEN
        -- a poll whose image predates what was stored during its call (a webhook's) changes nothing
        p.changed := r.md5 IS DISTINCT FROM s.qr_md5 AND r.qr IS NOT NULL
                     AND (r.source = 'webhook' OR s.qr_seen_at IS NULL OR s.qr_seen_at <= r.started_at);
        IF p.changed THEN
            p.repeats := 0;
            p.qr_seen_at := seen;
            -- and not before the image it replaced can have expired: Evolution makes the next one when the
            -- last one's life is over, so the window is the previous one's, not the whole gap between polls
            p.qr_born_after := CASE
                WHEN r.source = 'webhook' THEN seen
                WHEN slow THEN r.started_at
                ELSE least(seen, greatest(seen - life, CASE WHEN s.last_poll_at > seen - life THEN s.last_poll_at END,
                                          s.qr_born_after + life)) END;
            p.qr_expires_at := p.qr_born_after + life;
        ELSIF r.md5 IS NOT DISTINCT FROM s.qr_md5 THEN
            p.qr_born_after := greatest(s.qr_born_after, seen - life);
            p.qr_expires_at := p.qr_born_after + life;
        END IF;
        IF r.source = 'webhook' THEN
            p.due_at := greatest(coalesce(s.due_at, now()), now() + pgqr.seconds('webhook_safety_seconds'));
        ELSIF p.changed THEN
            p.due_at := greatest(p.qr_expires_at + pgqr.seconds('rotation_margin_seconds'), now() + rmin);
        ELSIF slow THEN
            p.due_at := now() + close_cadence;
        ELSIF now() > s.qr_seen_at + life + rmax THEN
            -- overdue: Evolution stopped rotating this one (or its lifetime is longer than the setting)
            p.due_at := now() + least(rmax * 2 ^ least(p.repeats, 10), pgqr.seconds('close_poll_max_seconds'));
        ELSE
            p.due_at := now() + least(greatest((s.qr_seen_at + life - now()) / 2, rmin), rmax);
        END IF;
    WHEN 'no_qr' THEN
        p.due_at := now() + least(pgqr.seconds('no_qr_retry_seconds') * 2 ^ least(p.repeats, 10), interval '30 seconds');
    WHEN 'closed', 'gave_up' THEN
        p.due_at := now() + close_cadence;
    WHEN 'failed' THEN
        p.due_at := now() + pgqr.backoff(r.error_class, s.consecutive_failures + 1);
    WHEN 'connected' THEN
        p.due_at := NULL;
    ELSE  -- event: a state change reported by webhook
        IF r.evolution_state = 'close' AND r.source = 'webhook' THEN
            p.due_at := least(coalesce(s.due_at, now() + close_cadence), now() + close_cadence);
        END IF;
    END CASE;
    RETURN p;
END
$$;

-- The one write path, for polls and webhooks alike; one call per batch, set-based.
--   * Poll results apply only while `writer` holds the instance's lease; webhooks hold none.
--   * Nothing here waits for a lock: a row the app (or another writer) holds is reported busy and the caller
--     hands it in again; an app row no longer in a waiting status is never written (the state guard).
--   * A QR image is written only when it changed, and never over one stored after the poll started.
--   * A webhook that repeats the Evolution state pgqr already holds writes nothing at all.
--   * Every poll and every webhook that changed something appends one refresh_log row; a new QR, a connect,
--     a give-up and a first failure send NOTIFY pgqr_qr_updated with the key and what happened (never a token,
--     never the QR).
CREATE FUNCTION pgqr.record_results(writer text, results jsonb)
RETURNS TABLE (key text, applied boolean, busy boolean, qr_updated boolean, outcome pgqr.outcome)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    b       pgqr.binding;
    rs      pgqr.result[];
    mine    text[];
    wants   text[];
    locked  text[];
    waiting text[];
    busy    text[];
    cap     integer := pgqr.setting('max_calls_per_minute')::integer;
    writes  pgqr.app_write[];
    changed text[];
    failing text[];
BEGIN
    SELECT * INTO b FROM pgqr.binding;
    -- one result per key (the last one wins), and webhook repeats dropped before anything is locked
    rs := ARRAY(
        SELECT r FROM (SELECT DISTINCT ON (x.key) x.* FROM jsonb_populate_recordset(NULL::pgqr.result, results)
                       WITH ORDINALITY AS x(key, source, outcome, md5, qr, pairing_code, qr_count, http_status,
                                            latency_ms, error_class, started_at, evolution_state, final, n)
                       ORDER BY x.key, x.n DESC) r0
        CROSS JOIN LATERAL (SELECT ROW(r0.key, r0.source, r0.outcome, r0.md5, r0.qr, r0.pairing_code, r0.qr_count,
                                       r0.http_status, r0.latency_ms, r0.error_class, r0.started_at,
                                       r0.evolution_state, r0.final)::pgqr.result AS r) y
        WHERE NOT (r0.source = 'webhook' AND r0.outcome = 'event' AND EXISTS (
            SELECT 1 FROM pgqr.instance_state s WHERE s.key = r0.key
               AND s.evolution_state IS NOT DISTINCT FROM r0.evolution_state)));

    -- the state rows we may write, locked in key order without waiting
    mine := ARRAY(
        SELECT s.key FROM pgqr.instance_state s JOIN unnest(rs) r ON r.key = s.key
        WHERE (r.source = 'webhook' AND s.waiting) OR (r.source = 'poll' AND s.lease_owner = writer)
        ORDER BY s.key FOR UPDATE OF s SKIP LOCKED);
    busy := ARRAY(
        SELECT r.key FROM unnest(rs) r JOIN pgqr.instance_state s ON s.key = r.key
        WHERE NOT r.key = ANY(mine)
          AND ((r.source = 'webhook' AND s.waiting) OR (r.source = 'poll' AND s.lease_owner = writer)));

    -- results that write the app's row: lock those rows too (SKIP LOCKED; only rows still waiting)
    wants := ARRAY(
        SELECT r.key FROM unnest(rs) r JOIN pgqr.instance_state s ON s.key = r.key
        WHERE r.key = ANY(mine) AND s.waiting
          AND ((r.outcome = 'qr' AND (pgqr.plan_next(s, r)).changed
                AND num_nonnulls(b.qr_column, b.qr_at_column, b.qr_expires_column, b.pairing_column) > 0)
               OR r.outcome = 'connected' OR (r.outcome = 'gave_up' AND b.gave_up_value IS NOT NULL)));
    IF cardinality(wants) > 0 THEN
        locked := ARRAY(SELECT pgqr.app_lock(wants));
        waiting := ARRAY(SELECT a.key FROM pgqr.app_rows(wants) a WHERE a.waiting);
        -- held by someone else: busy; no longer waiting: the guard drops the write (not busy, not applied)
        busy := busy || ARRAY(SELECT k FROM unnest(wants) k WHERE k = ANY(waiting) AND NOT k = ANY(coalesce(locked, '{}')));
        mine := ARRAY(SELECT k FROM unnest(mine) k WHERE NOT k = ANY(busy)
                      AND (NOT k = ANY(wants) OR k = ANY(coalesce(locked, '{}'))));
    END IF;

    -- the bookkeeping, with the next due time and the QR estimate
    WITH planned AS (
        -- a row no longer waiting keeps what pgqr knew of its QR: nothing was written to it
        SELECT r.*, p.changed AND s.waiting AS changed, p.due_at,
               CASE WHEN s.waiting THEN p.qr_born_after ELSE s.qr_born_after END AS qr_born_after,
               CASE WHEN s.waiting THEN p.qr_seen_at ELSE s.qr_seen_at END AS qr_seen_at,
               CASE WHEN s.waiting THEN p.qr_expires_at ELSE s.qr_expires_at END AS qr_expires_at, p.repeats
        FROM unnest(rs) r JOIN pgqr.instance_state s ON s.key = r.key, LATERAL pgqr.plan_next(s, r) p
        WHERE r.key = ANY(mine)
    ), upd AS (
        UPDATE pgqr.instance_state s SET
            -- the rate cap: never more than max_calls_per_minute polls of one instance in any 60 s
            due_at = CASE WHEN NOT s.waiting THEN NULL
                          WHEN x.source = 'poll' AND cardinality(s.recent_polls) + 1 >= cap
                          THEN greatest(x.due_at, (s.recent_polls || x.started_at)[cardinality(s.recent_polls) + 2 - cap]
                                                  + interval '60 seconds')
                          ELSE x.due_at END,
            lease_owner = CASE WHEN x.source = 'poll' THEN NULL ELSE s.lease_owner END,
            lease_expires_at = CASE WHEN x.source = 'poll' THEN NULL ELSE s.lease_expires_at END,
            last_poll_at = CASE WHEN x.source = 'poll' THEN x.started_at ELSE s.last_poll_at END,
            recent_polls = CASE WHEN x.source = 'poll'
                                THEN (s.recent_polls || x.started_at)[greatest(cardinality(s.recent_polls) + 2 - cap, 1):]
                                ELSE s.recent_polls END,
            last_outcome = x.outcome,
            last_error_class = x.error_class,
            last_http_status = coalesce(x.http_status, s.last_http_status),
            last_latency_ms = CASE WHEN x.source = 'poll' THEN x.latency_ms ELSE s.last_latency_ms END,
            last_success_at = CASE WHEN x.outcome IN ('qr', 'no_qr', 'connected', 'closed') THEN now()
                                   ELSE s.last_success_at END,
            consecutive_failures = CASE WHEN x.outcome = 'failed' THEN s.consecutive_failures + 1
                                        WHEN x.outcome = 'event' THEN s.consecutive_failures ELSE 0 END,
            repeats = x.repeats,
            evolution_state = coalesce(x.evolution_state, s.evolution_state),
            evolution_state_at = CASE WHEN x.evolution_state IS NOT NULL THEN now() ELSE s.evolution_state_at END,
            qr_md5 = CASE WHEN x.changed THEN x.md5 WHEN x.outcome IN ('connected', 'gave_up') THEN NULL ELSE s.qr_md5 END,
            qr_seen_at = x.qr_seen_at,
            qr_born_after = x.qr_born_after,
            qr_expires_at = CASE WHEN x.outcome IN ('connected', 'gave_up') THEN NULL ELSE x.qr_expires_at END,
            qr_source = CASE WHEN x.changed THEN x.source ELSE s.qr_source END,
            qr_count = coalesce(x.qr_count, s.qr_count),
            qr = CASE WHEN x.changed AND b.qr_column IS NULL THEN x.qr
                      WHEN x.outcome IN ('connected', 'gave_up') THEN NULL ELSE s.qr END,
            pairing_code = CASE WHEN x.changed AND b.pairing_column IS NULL THEN x.pairing_code
                                WHEN x.outcome IN ('connected', 'gave_up') THEN NULL ELSE s.pairing_code END
          FROM planned x
         WHERE s.key = x.key
        RETURNING s.name AS instance_name, s.waiting AS still_waiting, s.qr_expires_at AS expires_at,
                  s.consecutive_failures AS failures, x.*
    ), logged AS (
        INSERT INTO pgqr.refresh_log (instance_key, instance_name, source, outcome, applied, qr_updated,
                                      http_status, latency_ms, error_class, owner)
        SELECT u.key, u.instance_name, u.source, u.outcome, u.still_waiting, u.changed, u.http_status, u.latency_ms,
               u.error_class, writer
        FROM upd u
        RETURNING 1
    )
    SELECT array_agg(ROW(u.key, CASE WHEN u.changed THEN 'qr' ELSE u.outcome::text END,
                         u.qr, u.pairing_code, now(), u.expires_at)::pgqr.app_write)
             FILTER (WHERE u.still_waiting AND (u.changed OR u.outcome IN ('connected', 'gave_up'))),
           array_agg(u.key) FILTER (WHERE u.changed),
           array_agg(u.key) FILTER (WHERE u.outcome = 'failed' AND u.failures = 1 AND u.still_waiting)
      INTO writes, changed, failing
      FROM upd u;

    IF cardinality(writes) > 0 THEN
        PERFORM pgqr.app_write(writes);
        PERFORM pg_notify('pgqr_qr_updated', json_build_object(
                    'key', left(w.key, 200), 'event', w.kind, 'expires_at', w.qr_expires_at)::text)
           FROM unnest(writes) w;
    END IF;

    -- a first failure is news for whoever shows this instance (the live page); later ones are not
    PERFORM pg_notify('pgqr_qr_updated', json_build_object('key', left(k, 200), 'event', 'failed')::text)
       FROM unnest(failing) k;

    -- polls whose lease is gone (another replica took over), and the last hand-in of one still kept busy, are
    -- logged as not applied: the call did happen
    INSERT INTO pgqr.refresh_log (instance_key, instance_name, source, outcome, applied, qr_updated, http_status,
                                  latency_ms, error_class, owner)
    SELECT r.key, coalesce(s.name, ''), r.source, r.outcome, false, false, r.http_status, r.latency_ms,
           r.error_class, writer
    FROM unnest(rs) r LEFT JOIN pgqr.instance_state s ON s.key = r.key
    WHERE NOT r.key = ANY(mine) AND (NOT r.key = ANY(busy) OR coalesce(r.final, false)) AND r.source = 'poll';

    RETURN QUERY
    SELECT r.key, r.key = ANY(mine), r.key = ANY(busy) AND NOT coalesce(r.final, false),
           r.key = ANY(coalesce(changed, '{}')), r.outcome
    FROM unnest(rs) r;
END
$$;

-- On shutdown: give back what this listener still holds, so another replica can take it at once.
CREATE FUNCTION pgqr.release_leases(lease_holder text) RETURNS integer
LANGUAGE sql AS $$
    WITH released AS (
        UPDATE pgqr.instance_state
           SET lease_owner = NULL, lease_expires_at = NULL
         WHERE lease_owner = lease_holder
        RETURNING 1
    )
    SELECT count(*)::integer FROM released
$$;

-- The rows a webhook or a link names: Evolution's names are unique per Evolution server, not in the app's
-- table, so callers pick by server (url NULL: the default server). Tokens are returned for comparison only.
CREATE FUNCTION pgqr.find_instances(instance_name text)
RETURNS TABLE (key text, name text, token text, url text, waiting boolean)
LANGUAGE sql STABLE AS $$
    SELECT a.key, a.name, a.token, a.url, a.waiting
    FROM pgqr.app_rows(ARRAY(SELECT s.key FROM pgqr.instance_state s WHERE s.name = instance_name)) a
    WHERE a.name = instance_name
$$;

CREATE FUNCTION pgqr.heartbeat(listener text, listener_host text, listener_pid integer, listener_version text,
                               listen_ok boolean DEFAULT true)
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO pgqr.listener_heartbeats (owner, host, pid, version, listen_ok)
    VALUES (listener, listener_host, listener_pid, listener_version, listen_ok)
    ON CONFLICT (owner) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL, listen_ok = EXCLUDED.listen_ok
$$;

CREATE FUNCTION pgqr.listener_stopped(listener text) RETURNS void
LANGUAGE sql AS $$
    UPDATE pgqr.listener_heartbeats SET stopped_at = now() WHERE owner = listener
$$;
