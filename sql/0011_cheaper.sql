-- pgqr 0011: less database time per poll. The rules are 0010's, unchanged; what changes is what they cost.
--
-- * The settings the schedule's rules read are read once per batch (pgqr.plan_settings()), not a dozen times
--   per result: each pgqr.seconds() call is a statement of its own, and they were a third of plan_next's time.
-- * The latency histogram is built by PL/pgSQL step functions: a SQL function with a FROM clause is never
--   inlined, so the aggregate ran one small query per result.
-- pg_stat_statements, 10,000 polls returning the image pgqr already held: 0.327 ms of database time per poll
-- before this file (see the README's Performance section for after).

-- What plan_next reads from pgqr.settings, read once.
CREATE TYPE pgqr.plan_settings AS (
    life interval, margin interval, retry_min interval, retry_max interval, slow_ms float8, close_poll interval,
    close_poll_max interval, webhook_safety interval, no_qr_retry interval, max_calls integer);

CREATE FUNCTION pgqr.plan_settings() RETURNS pgqr.plan_settings
LANGUAGE sql STABLE AS $$
    SELECT ROW(pgqr.seconds('qr_lifetime_seconds'), pgqr.seconds('rotation_margin_seconds'),
               pgqr.seconds('retry_min_seconds'), pgqr.seconds('retry_max_seconds'),
               pgqr.setting('slow_connect_ms')::float8, pgqr.seconds('close_poll_seconds'),
               pgqr.seconds('close_poll_max_seconds'), pgqr.seconds('webhook_safety_seconds'),
               pgqr.seconds('no_qr_retry_seconds'), pgqr.setting('max_calls_per_minute')::integer)::pgqr.plan_settings
$$;

-- The rate cap (0009's rule) with the cap given: plain expressions, inlined where they are used.
CREATE FUNCTION pgqr.polls_kept(polls timestamptz[], max_calls integer) RETURNS timestamptz[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT polls[greatest(cardinality(polls) - max_calls + 1, 1):]
$$;

CREATE FUNCTION pgqr.poll_floor(polls timestamptz[], max_calls integer) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN cardinality(polls) >= max_calls
                THEN polls[cardinality(polls) - max_calls + 1] + interval '60 seconds' END
$$;

CREATE OR REPLACE FUNCTION pgqr.polls_kept(polls timestamptz[]) RETURNS timestamptz[]
LANGUAGE sql STABLE AS $$
    SELECT pgqr.polls_kept(polls, pgqr.setting('max_calls_per_minute')::integer)
$$;

CREATE OR REPLACE FUNCTION pgqr.poll_floor(polls timestamptz[]) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT pgqr.poll_floor(polls, pgqr.setting('max_calls_per_minute')::integer)
$$;

-- The schedule's rules (0010's plan_next, word for word), with the settings given.
CREATE FUNCTION pgqr.plan_next(s pgqr.instance_state, q pgqr.schedule, r pgqr.result, at timestamptz,
                               c pgqr.plan_settings)
RETURNS pgqr.plan
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    p       pgqr.plan;
    life    interval := c.life;
    rmin    interval := c.retry_min;
    rmax    interval := c.retry_max;
    started timestamptz := CASE WHEN r.source = 'poll' THEN coalesce(q.claimed_at, at) ELSE at END;
    seen    timestamptz := least(started + make_interval(secs => coalesce(r.latency_ms, 0) / 1000.0), at);
    slow    boolean := coalesce(r.latency_ms >= c.slow_ms, false);
    -- the estimate as narrowed by earlier polls of the same image
    born    timestamptz := greatest(s.qr_born_after, q.qr_alive_at - life);
    expires timestamptz := greatest(s.qr_expires_at, q.qr_alive_at);
    close_cadence interval;
BEGIN
    p := ROW(false, q.due_at, born, s.qr_seen_at, expires,
             CASE WHEN s.last_outcome IS NOT DISTINCT FROM r.outcome THEN q.repeats + 1 ELSE 0 END, false)::pgqr.plan;
    close_cadence := least(c.close_poll * 2 ^ least(p.repeats, 20),
                           c.close_poll_max);
    CASE r.outcome
    WHEN 'qr' THEN
        p.stale := r.md5 IS DISTINCT FROM s.qr_md5
                   AND coalesce(r.md5 = ANY(s.qr_history) OR (r.source = 'poll' AND s.qr_seen_at > started), false);
        p.changed := r.md5 IS DISTINCT FROM s.qr_md5 AND r.qr IS NOT NULL AND NOT p.stale;
        IF p.changed THEN
            p.repeats := 0;
            p.qr_seen_at := seen;
            -- and not before the image it replaced can have expired: Evolution makes the next one when the
            -- last one's life is over, so the window is the previous one's, not the whole gap between polls
            p.qr_born_after := CASE
                WHEN r.source = 'webhook' THEN seen
                WHEN slow THEN started
                ELSE least(seen, greatest(seen - life, CASE WHEN q.last_poll_at > seen - life THEN q.last_poll_at END,
                                          born + life)) END;
            p.qr_expires_at := p.qr_born_after + life;
        ELSIF r.md5 IS NOT DISTINCT FROM s.qr_md5 THEN
            p.qr_born_after := greatest(born, seen - life);
            p.qr_expires_at := p.qr_born_after + life;
        END IF;
        IF p.stale THEN
            p.due_at := CASE WHEN r.source = 'webhook' THEN q.due_at
                             ELSE greatest(coalesce(expires + c.margin, at),
                                           at + rmin) END;
        ELSIF r.source = 'webhook' THEN
            p.due_at := greatest(coalesce(q.due_at, at), at + c.webhook_safety);
        ELSIF p.changed THEN
            p.due_at := greatest(p.qr_expires_at + c.margin, at + rmin);
        ELSIF slow THEN
            p.due_at := at + close_cadence;
        ELSIF at > s.qr_seen_at + life + rmax THEN
            -- overdue: Evolution stopped rotating this one (or its lifetime is longer than the setting)
            p.due_at := at + least(rmax * 2 ^ least(p.repeats, 10), c.close_poll_max);
        ELSE
            p.due_at := at + least(greatest((s.qr_seen_at + life - at) / 2, rmin), rmax);
        END IF;
    WHEN 'no_qr' THEN
        p.due_at := at + least(c.no_qr_retry * 2 ^ least(p.repeats, 10), interval '30 seconds');
    WHEN 'closed', 'gave_up' THEN
        p.due_at := at + close_cadence;
    WHEN 'failed' THEN
        p.due_at := at + pgqr.backoff(r.error_class, q.consecutive_failures + 1);
    WHEN 'connected' THEN
        p.due_at := NULL;
    ELSE  -- event: a state change reported by webhook
        IF r.evolution_state = 'close' AND r.source = 'webhook' THEN
            p.due_at := least(coalesce(q.due_at, at + close_cadence), at + close_cadence);
        END IF;
    END CASE;
    -- the rate cap (a poll's own claim is already counted in recent_polls)
    p.due_at := CASE WHEN p.due_at IS NOT NULL THEN greatest(p.due_at, pgqr.poll_floor(q.recent_polls, c.max_calls)) END;
    RETURN p;
END
$$;

-- The rules with the settings as they are now: what a test or a person calls, row by row.
CREATE OR REPLACE FUNCTION pgqr.plan_next(s pgqr.instance_state, q pgqr.schedule, r pgqr.result, at timestamptz)
RETURNS pgqr.plan
LANGUAGE sql VOLATILE AS $$
    SELECT pgqr.plan_next(s, q, r, at, pgqr.plan_settings())
$$;

CREATE OR REPLACE FUNCTION pgqr.histogram_add(h integer[], ms real) RETURNS integer[]
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    b integer;
BEGIN
    IF ms IS NULL THEN
        RETURN h;
    END IF;
    b := width_bucket(ms, pgqr.latency_bounds()) + 1;
    h[b] := h[b] + 1;
    RETURN h;
END
$$;

CREATE OR REPLACE FUNCTION pgqr.histogram_merge(a integer[], b integer[]) RETURNS integer[]
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    FOR i IN 1 .. greatest(coalesce(cardinality(a), 0), coalesce(cardinality(b), 0)) LOOP
        a[i] := coalesce(a[i], 0) + coalesce(b[i], 0);
    END LOOP;
    RETURN a;
END
$$;

-- The one write path (0010's, word for word but for the settings, read once per batch).
CREATE OR REPLACE FUNCTION pgqr.record_results(writer text, results jsonb)
RETURNS TABLE (key text, written boolean, claim_held boolean, busy boolean, qr_updated boolean, outcome text,
               reason text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    b       pgqr.binding;
    at      timestamptz := now();
    c       pgqr.plan_settings := pgqr.plan_settings();
    rs      pgqr.result[];
    held    text[];
    mine    text[];
    busy    text[];
    pkeys   text[];
    plans   pgqr.plan[];
    wants   text[];
    locked  text[];
    gone    text[] := '{}';
    writes  pgqr.app_write[];
    refused text[] := '{}';
    details text[] := '{}';
    stale   text[];
    changed text[];
    failing text[];
BEGIN
    PERFORM pgqr.ensure_schedule();
    SELECT * INTO b FROM pgqr.binding;
    -- one result per key (the last one wins), and webhook repeats dropped before anything is locked
    rs := ARRAY(
        SELECT r FROM (SELECT DISTINCT ON (x.key) x.* FROM jsonb_populate_recordset(NULL::pgqr.result, results)
                       WITH ORDINALITY AS x(key, source, outcome, md5, qr, pairing_code, qr_count, http_status,
                                            latency_ms, error_class, evolution_state, final, claim_id, n)
                       ORDER BY x.key, x.n DESC) r0
        CROSS JOIN LATERAL (SELECT ROW(r0.key, r0.source, r0.outcome, r0.md5, r0.qr, r0.pairing_code, r0.qr_count,
                                       r0.http_status, r0.latency_ms, r0.error_class, r0.evolution_state,
                                       r0.final, r0.claim_id)::pgqr.result AS r) y
        WHERE NOT (r0.source = 'webhook' AND r0.outcome = 'event' AND EXISTS (
            SELECT 1 FROM pgqr.instance_state s WHERE s.key = r0.key
               AND s.evolution_state IS NOT DISTINCT FROM r0.evolution_state)));

    -- the instances we may write: their schedule rows locked in key order without waiting (the claim is checked
    -- on the locked row); every writer takes that lock first
    mine := ARRAY(
        SELECT q.key FROM pgqr.schedule q JOIN unnest(rs) r ON r.key = q.key JOIN pgqr.instance_state s ON s.key = q.key
        WHERE (r.source = 'webhook' AND s.waiting) OR (r.source = 'poll' AND q.claim_id = r.claim_id)
        ORDER BY q.key FOR UPDATE OF q SKIP LOCKED);
    held := mine || ARRAY(
        SELECT r.key FROM unnest(rs) r JOIN pgqr.schedule q ON q.key = r.key JOIN pgqr.instance_state s ON s.key = r.key
        WHERE NOT r.key = ANY(mine)
          AND ((r.source = 'webhook' AND s.waiting) OR (r.source = 'poll' AND q.claim_id = r.claim_id)));
    busy := ARRAY(SELECT k FROM unnest(held) k WHERE NOT k = ANY(mine));

    -- each plan once, on the locked rows
    SELECT coalesce(array_agg(r.key), '{}'), coalesce(array_agg(p), '{}') INTO pkeys, plans
    FROM unnest(rs) r JOIN pgqr.instance_state s ON s.key = r.key JOIN pgqr.schedule q ON q.key = r.key
    CROSS JOIN LATERAL pgqr.plan_next(s, q, r, at, c) p
    WHERE r.key = ANY(mine);

    -- results that write the app's row: lock those rows too (SKIP LOCKED; only rows still waiting)
    wants := ARRAY(
        SELECT r.key FROM unnest(pkeys) WITH ORDINALITY u(key, i) JOIN unnest(rs) r ON r.key = u.key
        WHERE (r.outcome = 'qr' AND (plans[u.i]).changed
               AND num_nonnulls(b.qr_column, b.qr_at_column, b.qr_expires_column, b.pairing_column) > 0)
           OR r.outcome = 'connected' OR (r.outcome = 'gave_up' AND b.gave_up_value IS NOT NULL));
    IF cardinality(wants) > 0 THEN
        locked := ARRAY(SELECT pgqr.app_lock(wants));
        -- held by someone else: busy; no longer waiting (a change made with triggers off): not written
        gone := ARRAY(SELECT k FROM unnest(wants) k
                      WHERE NOT EXISTS (SELECT 1 FROM pgqr.app_rows(wants) a WHERE a.key = k AND a.waiting));
        busy := busy || ARRAY(SELECT k FROM unnest(wants) k WHERE NOT k = ANY(gone) AND NOT k = ANY(locked));
        mine := ARRAY(SELECT k FROM unnest(mine) k WHERE NOT k = ANY(busy) AND NOT k = ANY(gone));
        writes := ARRAY(
            SELECT ROW(r.key, CASE WHEN r.outcome = 'qr' THEN 'qr' ELSE r.outcome::text END, r.qr, r.pairing_code,
                       at, (plans[u.i]).qr_expires_at)::pgqr.app_write
            FROM unnest(pkeys) WITH ORDINALITY u(key, i) JOIN unnest(rs) r ON r.key = u.key
            WHERE r.key = ANY(locked) AND r.key = ANY(mine));
        SELECT coalesce(array_agg(f.key), '{}'), coalesce(array_agg(f.detail), '{}') INTO refused, details
        FROM pgqr.app_write_each(writes) f;
    END IF;

    WITH planned AS (
        SELECT y.*,
               -- what pgqr.instance_state keeps, after this result
               CASE WHEN y.changed OR y.outcome IN ('connected', 'gave_up')
                    THEN pgqr.history_with(s.qr_history, s.qr_md5) ELSE s.qr_history END AS n_history,
               CASE WHEN y.changed THEN y.md5 WHEN y.outcome IN ('connected', 'gave_up') THEN NULL
                    ELSE s.qr_md5 END AS n_md5,
               -- only a new image moves the durable estimate; one seen again narrows it in the schedule
               CASE WHEN y.changed THEN y.p_seen ELSE s.qr_seen_at END AS n_seen,
               CASE WHEN y.changed THEN y.p_born ELSE s.qr_born_after END AS n_born,
               CASE WHEN y.outcome IN ('connected', 'gave_up') THEN NULL
                    WHEN y.changed THEN y.p_expires ELSE s.qr_expires_at END AS n_expires,
               CASE WHEN y.changed OR y.outcome IN ('connected', 'gave_up') THEN NULL
                    WHEN y.outcome = 'qr' AND NOT y.stale AND NOT y.refused AND y.md5 IS NOT DISTINCT FROM s.qr_md5
                    THEN y.p_expires END AS n_alive,
               CASE WHEN y.changed THEN y.source ELSE s.qr_source END AS n_source,
               coalesce(y.qr_count, s.qr_count) AS n_count,
               CASE WHEN y.changed AND b.qr_column IS NULL THEN y.qr
                    WHEN y.outcome IN ('connected', 'gave_up') THEN NULL ELSE s.qr END AS n_qr,
               CASE WHEN y.changed AND b.pairing_column IS NULL THEN y.pairing_code
                    WHEN y.outcome IN ('connected', 'gave_up') THEN NULL ELSE s.pairing_code END AS n_pairing,
               coalesce(y.evolution_state, s.evolution_state) AS n_state,
               CASE WHEN y.evolution_state IS DISTINCT FROM s.evolution_state AND y.evolution_state IS NOT NULL
                    THEN at ELSE s.evolution_state_at END AS n_state_at,
               s.name AS instance_name,
               -- news for the log: anything but the same outcome again
               y.changed OR y.refused OR y.stale OR y.outcome IN ('connected', 'gave_up')
                   OR s.last_outcome IS DISTINCT FROM y.outcome OR s.last_error_class IS DISTINCT FROM y.error_class
                   OR (y.evolution_state IS NOT NULL AND y.evolution_state IS DISTINCT FROM s.evolution_state)
                   AS news
        FROM (SELECT r.key, r.source, r.md5, r.qr, r.pairing_code, r.qr_count, r.http_status, r.latency_ms,
                     r.evolution_state, (plans[u.i]).due_at, (plans[u.i]).qr_born_after AS p_born,
                     (plans[u.i]).qr_seen_at AS p_seen, (plans[u.i]).qr_expires_at AS p_expires,
                     (plans[u.i]).repeats, (plans[u.i]).stale,
                     f.n IS NOT NULL AS refused, details[f.n] AS detail,
                     (plans[u.i]).changed AND f.n IS NULL AS changed,
                     CASE WHEN f.n IS NOT NULL THEN 'app_refused'::pgqr.outcome ELSE r.outcome END AS outcome,
                     CASE WHEN f.n IS NOT NULL THEN 'app_refused' ELSE r.error_class END AS error_class
              FROM unnest(pkeys) WITH ORDINALITY u(key, i)
              JOIN unnest(rs) r ON r.key = u.key
              LEFT JOIN unnest(refused) WITH ORDINALITY AS f(key, n) ON f.key = r.key
              WHERE r.key = ANY(mine)) y
        JOIN pgqr.instance_state s ON s.key = y.key
    ), sched AS (
        UPDATE pgqr.schedule q SET
            due_at = CASE WHEN x.refused
                          THEN greatest(at + pgqr.backoff('app_refused', q.consecutive_failures + 1),
                                        pgqr.poll_floor(q.recent_polls, c.max_calls))
                          ELSE x.due_at END,
            claim_id = CASE WHEN x.source = 'poll' THEN NULL ELSE q.claim_id END,
            lease_owner = CASE WHEN x.source = 'poll' THEN NULL ELSE q.lease_owner END,
            lease_expires_at = CASE WHEN x.source = 'poll' THEN NULL ELSE q.lease_expires_at END,
            last_poll_at = CASE WHEN x.source = 'poll' THEN q.claimed_at ELSE q.last_poll_at END,
            last_http_status = coalesce(x.http_status, q.last_http_status),
            last_latency_ms = CASE WHEN x.source = 'poll' THEN x.latency_ms ELSE q.last_latency_ms END,
            last_success_at = CASE WHEN x.outcome IN ('qr', 'no_qr', 'connected', 'closed') THEN at
                                   ELSE q.last_success_at END,
            consecutive_failures = CASE WHEN x.outcome IN ('failed', 'app_refused') THEN q.consecutive_failures + 1
                                        WHEN x.outcome = 'event' THEN q.consecutive_failures ELSE 0 END,
            repeats = x.repeats,
            qr_alive_at = CASE WHEN x.changed OR x.outcome IN ('connected', 'gave_up') THEN NULL
                               ELSE coalesce(x.n_alive, q.qr_alive_at) END
          FROM planned x
         WHERE q.key = x.key
        RETURNING q.key, q.consecutive_failures AS failures
    ), kept AS (
        UPDATE pgqr.instance_state s SET
            last_outcome = x.outcome, last_error_class = x.error_class,
            evolution_state = x.n_state, evolution_state_at = x.n_state_at,
            qr_history = x.n_history, qr_md5 = x.n_md5, qr_seen_at = x.n_seen, qr_born_after = x.n_born,
            qr_expires_at = x.n_expires, qr_source = x.n_source, qr_count = x.n_count, qr = x.n_qr,
            pairing_code = x.n_pairing
          FROM planned x
         WHERE s.key = x.key
           AND (s.last_outcome, s.last_error_class, s.evolution_state, s.evolution_state_at, s.qr_history, s.qr_md5,
                s.qr_seen_at, s.qr_born_after, s.qr_expires_at, s.qr_source, s.qr_count, s.qr, s.pairing_code)
               IS DISTINCT FROM
               (x.outcome, x.error_class, x.n_state, x.n_state_at, x.n_history, x.n_md5, x.n_seen, x.n_born,
                x.n_expires, x.n_source, x.n_count, x.n_qr, x.n_pairing)
        RETURNING 1
    ), logged AS (
        INSERT INTO pgqr.refresh_log (instance_key, instance_name, source, outcome, written, qr_updated,
                                      http_status, latency_ms, error_class, owner, detail)
        SELECT x.key, x.instance_name, x.source, x.outcome, NOT x.refused, x.changed, x.http_status, x.latency_ms,
               x.error_class, writer, x.detail
        FROM planned x
        WHERE x.news
        RETURNING 1
    )
    SELECT array_agg(x.key) FILTER (WHERE x.changed),
           array_agg(x.key) FILTER (WHERE x.stale),
           array_agg(x.key) FILTER (WHERE (x.outcome = 'failed' AND q.failures = 1) OR x.refused),
           array_agg(ROW(x.key, CASE WHEN x.changed THEN 'qr' ELSE x.outcome::text END, NULL, NULL, NULL,
                         x.n_expires)::pgqr.app_write)
             FILTER (WHERE x.changed OR x.outcome IN ('connected', 'gave_up'))
      INTO changed, stale, failing, writes
      FROM planned x JOIN sched q ON q.key = x.key;

    PERFORM pg_notify('pgqr_qr_updated', json_build_object(
                'key', left(w.key, 200), 'event', w.kind, 'expires_at', w.qr_expires_at)::text)
       FROM unnest(writes) w;
    -- a first failure (or a refusal) is news for whoever shows this instance (the live page); later ones are not
    PERFORM pg_notify('pgqr_qr_updated', json_build_object('key', left(k, 200), 'event', 'failed')::text)
       FROM unnest(failing) k;

    -- polls whose claim was superseded (or whose row left waiting), and the last hand-in of one still kept busy,
    -- are logged as not written: the call did happen
    INSERT INTO pgqr.refresh_log (instance_key, instance_name, source, outcome, written, qr_updated, http_status,
                                  latency_ms, error_class, owner, detail)
    SELECT r.key, coalesce(s.name, ''), r.source, r.outcome, false, false, r.http_status, r.latency_ms,
           r.error_class, writer,
           CASE WHEN r.key = ANY(busy) THEN 'busy' WHEN r.key = ANY(gone) THEN 'not_waiting' ELSE 'superseded' END
    FROM unnest(rs) r LEFT JOIN pgqr.instance_state s ON s.key = r.key
    WHERE NOT r.key = ANY(mine) AND (NOT r.key = ANY(busy) OR coalesce(r.final, false)) AND r.source = 'poll';

    -- every result once: what was written, and every poll that will not be handed in again (the call happened).
    -- In a fixed order, so two writers updating the same counters never deadlock.
    INSERT INTO pgqr.refresh_counts AS c (minute, source, outcome, error_class, results, written, qr_updates, latency)
    SELECT date_trunc('minute', at), r.source,
           CASE WHEN r.key = ANY(refused) THEN 'app_refused'::pgqr.outcome ELSE r.outcome END,
           CASE WHEN r.key = ANY(refused) THEN 'app_refused' ELSE coalesce(r.error_class, '') END,
           count(*), count(*) FILTER (WHERE r.key = ANY(mine) AND NOT r.key = ANY(refused)),
           count(*) FILTER (WHERE r.key = ANY(coalesce(changed, '{}'))), pgqr.histogram(r.latency_ms)
    FROM unnest(rs) r
    WHERE r.key = ANY(mine) OR (r.source = 'poll' AND (NOT r.key = ANY(busy) OR coalesce(r.final, false)))
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (minute, source, outcome, error_class) DO UPDATE
       SET results = c.results + excluded.results, written = c.written + excluded.written,
           qr_updates = c.qr_updates + excluded.qr_updates, latency = pgqr.histogram_merge(c.latency, excluded.latency);

    RETURN QUERY
    SELECT r.key, r.key = ANY(mine) AND NOT r.key = ANY(refused), r.key = ANY(held),
           r.key = ANY(busy) AND NOT coalesce(r.final, false),
           r.key = ANY(coalesce(changed, '{}')),
           CASE WHEN r.key = ANY(refused) THEN 'app_refused' ELSE r.outcome::text END,
           CASE WHEN r.key = ANY(refused) THEN details[array_position(refused, r.key)]
                WHEN r.key = ANY(busy) THEN 'busy'
                WHEN r.key = ANY(gone) THEN 'not_waiting'
                WHEN NOT r.key = ANY(held) THEN CASE WHEN r.source = 'poll' THEN 'superseded' ELSE 'not_waiting' END
                WHEN r.key = ANY(coalesce(stale, '{}')) THEN 'image_already_replaced' END
    FROM unnest(rs) r;
END
$$;

-- The claim (0010's), with the rate cap read once per claim.
CREATE OR REPLACE FUNCTION pgqr.claim(claim_owner text, max_rows integer, lease interval,
                                      due_by timestamptz DEFAULT now())
RETURNS TABLE (key text, name text, token text, url text, phone text, qr_md5 text, claimed_at timestamptz,
               claim_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    keys      text[];
    max_calls integer := pgqr.setting('max_calls_per_minute')::integer;
BEGIN
    PERFORM pgqr.ensure_schedule();
    keys := ARRAY(
        SELECT q.key FROM pgqr.schedule q
        WHERE q.due_at <= due_by AND (q.lease_expires_at IS NULL OR q.lease_expires_at <= now())
        ORDER BY q.due_at
        LIMIT greatest(max_rows, 0)
        FOR UPDATE OF q SKIP LOCKED);
    IF cardinality(keys) = 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH a AS MATERIALIZED (
        SELECT * FROM pgqr.app_rows(keys)
    ), resting AS (
        UPDATE pgqr.schedule q SET due_at = NULL, claim_id = NULL
         WHERE q.key = ANY(keys) AND NOT EXISTS (SELECT 1 FROM a WHERE a.key = q.key AND a.waiting)
        RETURNING q.key
    ), stopped AS (
        UPDATE pgqr.instance_state s SET waiting = false FROM resting r WHERE s.key = r.key AND s.waiting
        RETURNING 1
    ), claimed AS (
        UPDATE pgqr.schedule q
           SET claim_id = nextval('pgqr.claim_numbers'), claimed_at = now(),
               lease_owner = claim_owner, lease_expires_at = now() + lease, due_at = now() + lease,
               last_attempt_at = now(), recent_polls = pgqr.polls_kept(q.recent_polls || now(), max_calls)
          FROM a
         WHERE q.key = a.key AND a.waiting
        RETURNING q.key, a.name, a.token, a.url, a.phone, q.claimed_at, q.claim_id
    )
    SELECT c.key, c.name, c.token, c.url, c.phone, s.qr_md5, c.claimed_at, c.claim_id
    FROM claimed c LEFT JOIN pgqr.instance_state s ON s.key = c.key;
END
$$;

-- `pgqr status`: at most max_instances instances, those needing attention first (failing, then waiting without
-- a valid QR, then waiting, then the rest; by name within each), with the counts of all of them. A table of
-- 100,000 rows helps nobody, and building its document took seconds. NULL: every instance, by name, as
-- pgqr.status() (the document `pgqr status --json` prints) has always given.
CREATE FUNCTION pgqr.status(max_instances integer) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    WITH health AS (
        SELECT h.*, CASE WHEN max_instances IS NULL THEN 0
                         WHEN h.consecutive_failures > 0 THEN 0
                         WHEN h.waiting AND NOT h.qr_valid THEN 1
                         WHEN h.waiting THEN 2 ELSE 3 END AS attention
        FROM pgqr.instance_health h
    ), shown AS (
        SELECT h.* FROM health h ORDER BY h.attention, h.instance_name LIMIT max_instances
    )
    SELECT jsonb_build_object(
        'database', current_database(),
        'instances', coalesce((
            SELECT jsonb_agg(to_jsonb(h) - 'qr_age' - 'attention'
                             || jsonb_build_object('qr_age_seconds', round(extract(epoch FROM h.qr_age)))
                             ORDER BY h.attention, h.instance_name)
            FROM shown h), '[]'::jsonb),
        'instances_total', (SELECT count(*) FROM health),
        'instances_waiting', (SELECT count(*) FROM health WHERE waiting),
        'binding', (SELECT to_jsonb(b) - 'singleton' FROM pgqr.binding b),
        'freshness', (SELECT to_jsonb(f) FROM pgqr.freshness f),
        'trigger_errors', (SELECT count(*) FROM pgqr.trigger_errors),
        'listeners', coalesce((
            SELECT jsonb_agg(to_jsonb(l) - 'heartbeat_age'
                             || jsonb_build_object('heartbeat_age_seconds',
                                                   round(extract(epoch FROM l.heartbeat_age)))
                             ORDER BY l.heartbeat_at DESC)
            FROM pgqr.listeners l), '[]'::jsonb),
        'jobs', coalesce((
            SELECT jsonb_agg(jsonb_build_object('name', j.name, 'schedule', j.schedule, 'active', j.active)
                             ORDER BY j.name)
            FROM pgqr.jobs j), '[]'::jsonb),
        'last_tick_at', (SELECT max(k.at) FROM pgqr.ticks k),
        'alerts_firing', coalesce((
            SELECT jsonb_agg(jsonb_build_object('rule', a.rule, 'count', a.count, 'detail', a.detail,
                                                'fired_at', a.fired_at) ORDER BY a.fired_at)
            FROM pgqr.alerts a WHERE a.state = 'firing'), '[]'::jsonb))
$$;

CREATE OR REPLACE FUNCTION pgqr.status() RETURNS jsonb
LANGUAGE sql STABLE AS $$ SELECT pgqr.status(NULL) $$;
