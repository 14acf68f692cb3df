-- pgqr 0010: a quiet neighbour. pgqr lives in the app's database, whose WAL, replicas, backups and disk the app's
-- owner pays for; an unchanged poll should cost that database next to nothing durable.
--
-- * What only schedules the next call (due time, claim, lease, recent polls, repeats, the failure count, and the
--   last call's time, latency and HTTP status, the expiry estimate as narrowed by polls that returned the same
--   image) lives in pgqr.schedule, an UNLOGGED table: no WAL. A crash or a
--   failover empties it; the first claim, next_due_in() or write-back after that rebuilds it from the durable
--   state (each checks pgqr.schedule_built, which empties with it), so `pgqr run` does not wait for the tick.
-- * pgqr.instance_state keeps what must survive: the name-to-key mapping webhooks are matched by, waiting, the
--   QR estimate, the QR itself for a table without a QR column, Evolution's last state, the image history. It is
--   written only when one of those changes; the schedule row is the instance's lock (an unlogged row lock costs
--   no WAL), taken first by every writer.
-- * refresh_log gets a row for news only (a new QR, an outcome or error class other than the last, a state
--   change, a connect, a give-up, a late image, a result not written and why). Every result is still counted,
--   per minute, source, outcome and error class, with its latency in histogram buckets: pgqr.refresh_counts.
-- * An app row is never rewritten with the image it already holds.

CREATE UNLOGGED TABLE pgqr.schedule (
    key                  text PRIMARY KEY,      -- pgqr.instance_state.key (no foreign key: its check locks that row)
    due_at               timestamptz,           -- next poll; NULL while not waiting
    claim_id             bigint,                -- the pending claim's number: only that call's result may write
    claimed_at           timestamptz,           -- when it was made, by the database's clock: the call's start
    lease_owner          text,
    lease_expires_at     timestamptz,
    recent_polls         timestamptz[] NOT NULL DEFAULT '{}',  -- start times of the last claims (the rate cap)
    repeats              integer NOT NULL DEFAULT 0,           -- results in a row with the same outcome
    consecutive_failures integer NOT NULL DEFAULT 0,
    last_poll_at         timestamptz,           -- the start of the last poll written (a new QR's earliest birth)
    last_attempt_at      timestamptz,
    last_success_at      timestamptz,
    last_http_status     integer,
    last_latency_ms      real,
    -- the latest moment the current image is known to have been current (a poll that returned it again): the
    -- expiry estimate narrowed by polls, kept here so an unchanged poll writes nothing durable. The estimate
    -- served is the later of this and instance_state.qr_expires_at; after a crash it falls back to the durable
    -- one, which is earlier (safe: the next poll is due at once by it).
    qr_alive_at          timestamptz
);
CREATE INDEX schedule_due_idx ON pgqr.schedule (due_at) WHERE due_at IS NOT NULL;

-- One row while pgqr.schedule has been built since the last crash (both are emptied together).
CREATE UNLOGGED TABLE pgqr.schedule_built (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    at        timestamptz NOT NULL DEFAULT now()
);

INSERT INTO pgqr.schedule (key, due_at, claim_id, claimed_at, lease_owner, lease_expires_at, recent_polls, repeats,
                           consecutive_failures, last_poll_at, last_attempt_at, last_success_at, last_http_status,
                           last_latency_ms)
SELECT key, CASE WHEN waiting THEN due_at END, claim_id, claimed_at, lease_owner, lease_expires_at, recent_polls,
       repeats, consecutive_failures, last_poll_at, last_attempt_at, last_success_at, last_http_status,
       last_latency_ms
FROM pgqr.instance_state;
INSERT INTO pgqr.schedule_built DEFAULT VALUES;

-- The readers of the moved columns, the same columns as before.
CREATE OR REPLACE VIEW pgqr.instance_health AS
SELECT a.key                                  AS instance_key,
       a.name                                 AS instance_name,
       a.status,
       coalesce(a.waiting, false)             AS waiting,
       (a.qr IS NOT NULL OR s.qr IS NOT NULL OR s.qr_md5 IS NOT NULL) AS has_qr,
       s.qr_seen_at                           AS last_qr_update,
       now() - s.qr_seen_at                   AS qr_age,
       greatest(s.qr_expires_at, q.qr_alive_at) AS qr_expires_at,
       coalesce(a.waiting AND greatest(s.qr_expires_at, q.qr_alive_at) > now(), false) AS qr_valid,
       s.qr_source,
       s.evolution_state,
       q.last_attempt_at,
       q.last_success_at,
       s.last_outcome,
       s.last_error_class,
       q.last_http_status,
       coalesce(q.consecutive_failures, 0)    AS consecutive_failures,
       q.due_at                               AS next_attempt_at,
       q.lease_owner,
       q.lease_expires_at,
       s.connecting_since
FROM pgqr.app_instances a
LEFT JOIN pgqr.instance_state s ON s.key = a.key
LEFT JOIN pgqr.schedule q ON q.key = a.key;

CREATE OR REPLACE VIEW pgqr.freshness AS
SELECT count(*) FILTER (WHERE s.waiting)                                   AS waiting,
       count(*) FILTER (WHERE s.waiting AND greatest(s.qr_expires_at, q.qr_alive_at) > now()) AS qr_valid,
       coalesce(extract(epoch FROM max(now() - greatest(s.qr_expires_at, q.qr_alive_at))
                FILTER (WHERE s.waiting AND greatest(s.qr_expires_at, q.qr_alive_at) <= now())), 0)::float8
           AS oldest_expired_seconds
FROM pgqr.instance_state s
LEFT JOIN pgqr.schedule q ON q.key = s.key;

CREATE OR REPLACE VIEW pgqr.listeners AS
SELECT l.owner,
       l.host,
       l.pid,
       l.version,
       l.started_at,
       l.heartbeat_at,
       now() - l.heartbeat_at AS heartbeat_age,
       l.heartbeat_at >= now() - coalesce(
           (SELECT value::interval FROM pgqr.settings WHERE key = 'alert_listener_after'),
           interval '2 minutes') AS live,
       (SELECT count(*) FROM pgqr.schedule q
         WHERE q.lease_owner = l.owner AND q.lease_expires_at > now()) AS leases_held,
       l.listen_ok
FROM pgqr.listener_heartbeats l
WHERE l.stopped_at IS NULL
ORDER BY l.heartbeat_at DESC;

CREATE OR REPLACE FUNCTION pgqr.stale_instances(threshold interval DEFAULT '5 minutes')
RETURNS TABLE (instance_key text, instance_name text, last_qr_update timestamptz, qr_expires_at timestamptz,
               waiting interval, last_attempt_at timestamptz, last_outcome pgqr.outcome, last_error_class text,
               consecutive_failures integer)
LANGUAGE sql STABLE AS $$
    SELECT s.key, s.name, s.qr_seen_at, greatest(s.qr_expires_at, q.qr_alive_at),
           now() - greatest(s.qr_expires_at, q.qr_alive_at, s.connecting_since),
           q.last_attempt_at, s.last_outcome, s.last_error_class, coalesce(q.consecutive_failures, 0)
    FROM pgqr.instance_state s
    LEFT JOIN pgqr.schedule q ON q.key = s.key
    WHERE s.waiting
      AND greatest(s.qr_expires_at, q.qr_alive_at, s.connecting_since) < now() - threshold
    ORDER BY greatest(s.qr_expires_at, q.qr_alive_at, s.connecting_since), s.name
$$;

DROP FUNCTION pgqr.plan_next(pgqr.instance_state, pgqr.result, timestamptz);
ALTER TABLE pgqr.instance_state
    DROP COLUMN due_at, DROP COLUMN claim_id, DROP COLUMN claimed_at, DROP COLUMN lease_owner,
    DROP COLUMN lease_expires_at, DROP COLUMN recent_polls, DROP COLUMN repeats, DROP COLUMN consecutive_failures,
    DROP COLUMN last_poll_at, DROP COLUMN last_attempt_at, DROP COLUMN last_success_at,
    DROP COLUMN last_http_status, DROP COLUMN last_latency_ms;
COMMENT ON COLUMN pgqr.instance_state.evolution_state_at IS 'when Evolution''s state last changed';

-- Bring pgqr.schedule in step with pgqr.instance_state: a row for every instance that lacks one, a waiting one
-- due when its stored QR can expire (at once if it has none), and the mark that it is built. Cheap when nothing
-- is missing. Called after a crash (see ensure_schedule) and by every tick.
CREATE FUNCTION pgqr.rebuild_schedule() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    INSERT INTO pgqr.schedule (key, due_at)
    SELECT s.key, CASE WHEN s.waiting
                       THEN greatest(now(), coalesce(s.qr_expires_at + pgqr.seconds('rotation_margin_seconds'), now()))
                       END
    FROM pgqr.instance_state s
    WHERE NOT EXISTS (SELECT 1 FROM pgqr.schedule q WHERE q.key = s.key)
    ON CONFLICT (key) DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO pgqr.schedule_built DEFAULT VALUES ON CONFLICT DO NOTHING;
    RETURN n;
END
$$;

CREATE FUNCTION pgqr.ensure_schedule() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgqr.schedule_built) THEN
        PERFORM pgqr.rebuild_schedule();
    END IF;
END
$$;

-- Lease up to max_rows instances due by `due_by` to `claim_owner` for `lease`, earliest due first, and return
-- what calling Evolution for them takes (the token only ever goes into the apikey header) with the claim's number
-- and time. A claimed row's due_at is its lease's end, so leased rows are not at the head of the due index.
-- Rows the app has moved out of waiting without pgqr's trigger (triggers off) are put to rest instead.
CREATE OR REPLACE FUNCTION pgqr.claim(claim_owner text, max_rows integer, lease interval,
                                      due_by timestamptz DEFAULT now())
RETURNS TABLE (key text, name text, token text, url text, phone text, qr_md5 text, claimed_at timestamptz,
               claim_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    keys text[];
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
               last_attempt_at = now(), recent_polls = pgqr.polls_kept(q.recent_polls || now())
          FROM a
         WHERE q.key = a.key AND a.waiting
        RETURNING q.key, a.name, a.token, a.url, a.phone, q.claimed_at, q.claim_id
    )
    SELECT c.key, c.name, c.token, c.url, c.phone, s.qr_md5, c.claimed_at, c.claim_id
    FROM claimed c LEFT JOIN pgqr.instance_state s ON s.key = c.key;
END
$$;

-- Seconds until the earliest instance falls due (0: one is due now), NULL when none waits: how long a listener
-- may sleep before claiming again. One step down the due index.
CREATE OR REPLACE FUNCTION pgqr.next_due_in() RETURNS float8
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgqr.ensure_schedule();
    RETURN (SELECT greatest(extract(epoch FROM q.due_at - now()), 0)::float8
            FROM pgqr.schedule q WHERE q.due_at IS NOT NULL ORDER BY q.due_at LIMIT 1);
END
$$;

-- The schedule that follows the QR's life (the engine's rules, in one place), for instance `s` with schedule
-- `q`, at the database's time `at`. The rules are 0009's, unchanged; only where each input lives moved.
--   A poll started when it was claimed (q.claimed_at) and saw its reply latency_ms later; a webhook sees at `at`.
--   A new image was made between the last poll that did not return it and the reply that did (a webhook
--   brings it as it is made; a connect slow enough to have gone through Evolution's close branch made it
--   during the call). It expires one lifetime after that, so the next poll is due just after the earliest
--   possible expiry. A poll that still returns the same image narrows the estimate (the image was current
--   then) and retries soon, half the remaining window at a time, within [retry_min, retry_max]. Only a fast
--   reply proves Evolution answered from memory; a slow one that returns the same image went through its close
--   branch, which opens a socket each time: that is polled at the slow, doubling close cadence.
--   A QR brought by webhook moves the next poll out to the slow safety cadence: webhooks bring the next.
--   An image the instance has already had (a late poll, a retried webhook) or one older than what was stored
--   during the poll is stale: it changes nothing, and the next poll is due after the current image's expiry.
--   No poll is due before the rate cap allows it.
CREATE FUNCTION pgqr.plan_next(s pgqr.instance_state, q pgqr.schedule, r pgqr.result, at timestamptz)
RETURNS pgqr.plan
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    p       pgqr.plan;
    life    interval := pgqr.seconds('qr_lifetime_seconds');
    rmin    interval := pgqr.seconds('retry_min_seconds');
    rmax    interval := pgqr.seconds('retry_max_seconds');
    started timestamptz := CASE WHEN r.source = 'poll' THEN coalesce(q.claimed_at, at) ELSE at END;
    seen    timestamptz := least(started + make_interval(secs => coalesce(r.latency_ms, 0) / 1000.0), at);
    slow    boolean := coalesce(r.latency_ms >= pgqr.setting('slow_connect_ms')::float8, false);
    -- the estimate as narrowed by earlier polls of the same image
    born    timestamptz := greatest(s.qr_born_after, q.qr_alive_at - life);
    expires timestamptz := greatest(s.qr_expires_at, q.qr_alive_at);
    close_cadence interval;
BEGIN
    p := ROW(false, q.due_at, born, s.qr_seen_at, expires,
             CASE WHEN s.last_outcome IS NOT DISTINCT FROM r.outcome THEN q.repeats + 1 ELSE 0 END, false)::pgqr.plan;
    close_cadence := least(pgqr.seconds('close_poll_seconds') * 2 ^ least(p.repeats, 20),
                           pgqr.seconds('close_poll_max_seconds'));
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
                             ELSE greatest(coalesce(expires + pgqr.seconds('rotation_margin_seconds'), at),
                                           at + rmin) END;
        ELSIF r.source = 'webhook' THEN
            p.due_at := greatest(coalesce(q.due_at, at), at + pgqr.seconds('webhook_safety_seconds'));
        ELSIF p.changed THEN
            p.due_at := greatest(p.qr_expires_at + pgqr.seconds('rotation_margin_seconds'), at + rmin);
        ELSIF slow THEN
            p.due_at := at + close_cadence;
        ELSIF at > s.qr_seen_at + life + rmax THEN
            -- overdue: Evolution stopped rotating this one (or its lifetime is longer than the setting)
            p.due_at := at + least(rmax * 2 ^ least(p.repeats, 10), pgqr.seconds('close_poll_max_seconds'));
        ELSE
            p.due_at := at + least(greatest((s.qr_seen_at + life - at) / 2, rmin), rmax);
        END IF;
    WHEN 'no_qr' THEN
        p.due_at := at + least(pgqr.seconds('no_qr_retry_seconds') * 2 ^ least(p.repeats, 10), interval '30 seconds');
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
    p.due_at := CASE WHEN p.due_at IS NOT NULL THEN greatest(p.due_at, pgqr.poll_floor(q.recent_polls)) END;
    RETURN p;
END
$$;

-- Every result counted, per minute, source, outcome and error class ('' for none), with its latency in
-- histogram buckets: what pgqr.refresh_stats and the failure-rate alert read, now that the log keeps news only.
CREATE TABLE pgqr.refresh_counts (
    minute      timestamptz NOT NULL,
    source      pgqr.source NOT NULL,
    outcome     pgqr.outcome NOT NULL,
    error_class text NOT NULL,
    results     integer NOT NULL,   -- polls (Evolution calls) or webhooks
    written     integer NOT NULL,
    qr_updates  integer NOT NULL,
    latency     integer[] NOT NULL, -- counts per bucket of pgqr.latency_bounds(), then one for slower
    PRIMARY KEY (minute, source, outcome, error_class)
) WITH (fillfactor = 50);  -- room for each minute's updates on its own page (HOT: no index entry each time)

-- Upper bounds (ms) of the latency buckets: Evolution answers from memory in tens of ms, through its close
-- branch in seconds.
CREATE FUNCTION pgqr.latency_bounds() RETURNS real[]
LANGUAGE sql IMMUTABLE AS $$ SELECT '{25,50,100,250,500,1000,2500,5000,10000,30000}'::real[] $$;

CREATE FUNCTION pgqr.histogram_add(h integer[], ms real) RETURNS integer[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN ms IS NULL THEN h ELSE h[:b - 1] || (h[b] + 1) || h[b + 1:] END
    FROM (SELECT width_bucket(ms, pgqr.latency_bounds()) + 1 AS b) x
$$;

CREATE FUNCTION pgqr.histogram_merge(a integer[], b integer[]) RETURNS integer[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT array_agg(coalesce(x, 0) + coalesce(y, 0) ORDER BY i) FROM unnest(a, b) WITH ORDINALITY u(x, y, i)
$$;

CREATE AGGREGATE pgqr.histogram(real) (
    SFUNC = pgqr.histogram_add, STYPE = integer[], INITCOND = '{0,0,0,0,0,0,0,0,0,0,0}');
CREATE AGGREGATE pgqr.histogram_sum(integer[]) (
    SFUNC = pgqr.histogram_merge, STYPE = integer[], INITCOND = '{0,0,0,0,0,0,0,0,0,0,0}');

-- The q-quantile of a histogram, interpolated linearly inside its bucket (as Prometheus' histogram_quantile):
-- an estimate within the bucket's bounds. NULL for an empty histogram; the slowest bucket answers its lower bound.
CREATE FUNCTION pgqr.histogram_quantile(h integer[], q float8) RETURNS float8
LANGUAGE sql IMMUTABLE AS $$
    SELECT c.lo + (c.hi - c.lo) * (c.rank - (c.cum - c.n)) / c.n
    FROM (SELECT u.n, sum(u.n) OVER (ORDER BY u.i) AS cum, sum(u.n) OVER () * q AS rank,
                 coalesce((pgqr.latency_bounds())[u.i - 1], 0)::float8 AS lo,
                 coalesce((pgqr.latency_bounds())[u.i], (pgqr.latency_bounds())[u.i - 1])::float8 AS hi
          FROM unnest(h) WITH ORDINALITY u(n, i)) c
    WHERE c.n > 0 AND c.cum >= c.rank
    ORDER BY c.cum
    LIMIT 1
$$;

-- Per hour over the last 24 hours (every hour listed, quiet ones as zeros), from the counts. calls: Evolution
-- calls made by listeners (source poll); webhook_events: what Evolution pushed; successes and failures count
-- both sources. The latency percentiles are estimates from the buckets; instances counts the instances with
-- news in the hour (the log keeps news only), a lower bound of those refreshed.
CREATE OR REPLACE VIEW pgqr.refresh_stats AS
WITH hours AS (
    SELECT generate_series(date_trunc('hour', now()) - interval '23 hours', date_trunc('hour', now()),
                           interval '1 hour') AS hour
), counts AS (
    SELECT date_trunc('hour', c.minute) AS hour, c.*
    FROM pgqr.refresh_counts c
    WHERE c.minute >= date_trunc('hour', now()) - interval '23 hours'
), by_hour AS (
    SELECT c.hour,
           sum(c.results) FILTER (WHERE c.source = 'poll')                           AS calls,
           sum(c.results) FILTER (WHERE c.source = 'webhook')                        AS webhook_events,
           sum(c.results) FILTER (WHERE c.outcome IN ('qr', 'no_qr', 'connected'))   AS successes,
           sum(c.results) FILTER (WHERE c.outcome = 'failed')                        AS failures,
           sum(c.qr_updates)                                                         AS qr_updates,
           pgqr.histogram_sum(c.latency)                                             AS latency
    FROM counts c GROUP BY c.hour
), by_class AS (
    SELECT x.hour, jsonb_object_agg(x.error_class, x.n) AS failures_by_class
    FROM (SELECT hour, coalesce(nullif(error_class, ''), 'unknown') AS error_class, sum(results) AS n
          FROM counts WHERE outcome = 'failed' GROUP BY 1, 2) x
    GROUP BY x.hour
), news AS (
    SELECT date_trunc('hour', l.at) AS hour, count(DISTINCT l.instance_key) AS instances
    FROM pgqr.refresh_log l
    WHERE l.at >= date_trunc('hour', now()) - interval '23 hours'
    GROUP BY 1
)
SELECT h.hour,
       coalesce(c.calls, 0)::bigint                            AS calls,
       coalesce(c.webhook_events, 0)::bigint                   AS webhook_events,
       coalesce(c.successes, 0)::bigint                        AS successes,
       coalesce(c.failures, 0)::bigint                         AS failures,
       coalesce(b.failures_by_class, '{}'::jsonb)              AS failures_by_class,
       coalesce(c.qr_updates, 0)::bigint                       AS qr_updates,
       coalesce(n.instances, 0)::bigint                        AS instances,
       pgqr.histogram_quantile(c.latency, 0.5)                 AS p50_latency_ms,
       pgqr.histogram_quantile(c.latency, 0.95)                AS p95_latency_ms
FROM hours h
LEFT JOIN by_hour c ON c.hour = h.hour
LEFT JOIN by_class b ON b.hour = h.hour
LEFT JOIN news n ON n.hour = h.hour
ORDER BY h.hour DESC;

-- The failure rate over the alert's window, from the counts (whole minutes: the window starts at the minute
-- that holds its start).
CREATE OR REPLACE VIEW pgqr.alert_evolution_failures AS
SELECT 'evolution_failures'::text AS rule,
       x.calls >= x.min_calls AND coalesce(x.failures::float8 / nullif(x.calls, 0) > x.max_rate, false) AS firing,
       x.failures AS count,
       format('%s of %s Evolution calls failed in the last %s (%s%%, threshold %s%%)%s',
              x.failures, x.calls, pgqr.human_interval(x.threshold),
              CASE WHEN x.calls > 0 THEN round(100.0 * x.failures / x.calls) ELSE 0 END,
              round((100 * x.max_rate)::numeric), coalesce(': ' || x.classes, '')) AS detail
FROM (SELECT y.*,
             (SELECT coalesce(sum(c.results), 0) FROM pgqr.refresh_counts c
               WHERE c.source = 'poll' AND c.minute >= date_trunc('minute', now() - y.threshold))::integer AS calls,
             (SELECT coalesce(sum(c.results), 0) FROM pgqr.refresh_counts c
               WHERE c.source = 'poll' AND c.outcome = 'failed'
                 AND c.minute >= date_trunc('minute', now() - y.threshold))::integer AS failures,
             (SELECT string_agg(format('%s %s', f.error_class, f.n), ', ' ORDER BY f.n DESC, f.error_class)
                FROM (SELECT coalesce(nullif(c.error_class, ''), 'unknown') AS error_class, sum(c.results) AS n
                        FROM pgqr.refresh_counts c
                       WHERE c.source = 'poll' AND c.outcome = 'failed'
                         AND c.minute >= date_trunc('minute', now() - y.threshold)
                       GROUP BY 1) f) AS classes
      FROM (SELECT pgqr.setting('alert_failure_window')::interval AS threshold,
                   pgqr.setting('alert_failure_rate')::float8 AS max_rate,
                   pgqr.setting('alert_failure_min_calls')::integer AS min_calls) y) x;

-- The one write path, for polls and webhooks alike; one call per batch, set-based (0009's rules, unchanged):
--   * A poll result writes only while its claim is the instance's pending one (claim_held); a webhook only
--     while the instance waits. A superseded result writes nothing, to the app's row or to pgqr's estimate.
--   * Nothing here waits for a lock: a row the app (or another writer) holds is reported busy and the caller
--     hands it in again; an app row no longer in a waiting status is never written (the state guard).
--   * A QR image is written only when it is new: never one the instance already had, never one older than
--     what was stored during the poll. A webhook that repeats the Evolution state pgqr holds writes nothing.
--   * A row the app's table refuses is that instance's app_refused; the rest of the batch commits.
--   * pgqr.instance_state is written only where what it keeps changes; pgqr.refresh_log gets news only;
--     pgqr.refresh_counts counts every result once (a busy one when it is finally handed in).
--   * A new QR, a connect, a give-up and a first failure send NOTIFY pgqr_qr_updated with the key and what
--     happened (never a token, never the QR).
-- Returns, per result: written (it took effect), claim_held (a poll's claim was still the instance's; a
-- webhook's instance was waiting), busy (hand it in again), qr_updated, the outcome recorded, and why it was
-- not written (superseded, not_waiting, busy, or the app's refusal) or that its image was already replaced.
CREATE OR REPLACE FUNCTION pgqr.record_results(writer text, results jsonb)
RETURNS TABLE (key text, written boolean, claim_held boolean, busy boolean, qr_updated boolean, outcome text,
               reason text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    b       pgqr.binding;
    at      timestamptz := now();
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
    CROSS JOIN LATERAL pgqr.plan_next(s, q, r, at) p
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
                                        pgqr.poll_floor(q.recent_polls))
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

-- On shutdown: give back what this listener still holds (calls that never finished), due again at once as far
-- as the rate cap allows, so another replica can take it.
CREATE OR REPLACE FUNCTION pgqr.release_leases(lease_holder text) RETURNS integer
LANGUAGE sql AS $$
    WITH released AS (
        UPDATE pgqr.schedule
           SET lease_owner = NULL, lease_expires_at = NULL, claim_id = NULL,
               due_at = CASE WHEN due_at IS NOT NULL
                             THEN least(due_at, greatest(now(), pgqr.poll_floor(recent_polls))) END
         WHERE lease_owner = lease_holder
        RETURNING 1
    )
    SELECT count(*)::integer FROM released
$$;

-- What pgqr does when an app row changes under it: one rule for the trigger (one row) and the tick's sync (the
-- rows changed with triggers off), 0009's, with the schedule in its own table. A row that starts or stops
-- waiting, or whose call target moved (its name, Evolution URL or token changed), has its pending claim
-- superseded; one that starts waiting, or moved while waiting, is due now as far as the rate cap allows, with a
-- fresh count of failures and repeats. pgqr.instance_state is written only where its name or waiting changes.
-- Returns the keys that started waiting (the trigger wakes the listeners for them).
CREATE TYPE pgqr.tracked AS (key text, name text, waiting boolean, moved boolean, starts boolean, renamed boolean);

CREATE OR REPLACE FUNCTION pgqr.track(changes pgqr.app_change[]) RETURNS TABLE (key text, started boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    c     pgqr.app_change[] := ARRAY(SELECT DISTINCT ON (x.key) ROW(x.key, coalesce(x.name, ''),
                                            coalesce(x.waiting, false), coalesce(x.moved, false))::pgqr.app_change
                                     FROM unnest(changes) x);
    added text[];
    d     pgqr.tracked[];
BEGIN
    WITH ins AS (
        INSERT INTO pgqr.instance_state (key, name, waiting)
        SELECT x.key, x.name, x.waiting FROM unnest(c) x
        ON CONFLICT (key) DO NOTHING
        RETURNING key)
    SELECT coalesce(array_agg(i.key), '{}') INTO added FROM ins i;
    INSERT INTO pgqr.schedule AS q (key, due_at)
    SELECT x.key, CASE WHEN x.waiting THEN now() END FROM unnest(c) x WHERE x.key = ANY(added)
    ON CONFLICT (key) DO UPDATE
       SET due_at = excluded.due_at, claim_id = NULL, lease_owner = NULL, lease_expires_at = NULL, repeats = 0,
           consecutive_failures = 0;
    -- lock in key order (the trigger and the sync never deadlock, with each other or a write-back), then read
    PERFORM 1 FROM pgqr.schedule q JOIN unnest(c) x ON x.key = q.key
     WHERE NOT q.key = ANY(added) ORDER BY q.key FOR UPDATE OF q;
    d := ARRAY(
        SELECT ROW(x.key, x.name, x.waiting, x.moved, x.waiting AND NOT s.waiting,
                   s.name IS DISTINCT FROM x.name)::pgqr.tracked
        FROM unnest(c) x JOIN pgqr.instance_state s ON s.key = x.key
        WHERE NOT s.key = ANY(added)
          AND (s.name IS DISTINCT FROM x.name OR s.waiting IS DISTINCT FROM x.waiting OR (x.moved AND s.waiting)));
    UPDATE pgqr.instance_state s
       SET name = x.name, waiting = x.waiting,
           connecting_since = CASE WHEN x.starts THEN now() ELSE s.connecting_since END,
           -- the app may have cleared its QR (or the row now names another instance): the next image is news
           qr_md5 = CASE WHEN x.starts OR x.moved THEN NULL ELSE s.qr_md5 END
      FROM unnest(d) x
     WHERE s.key = x.key
       AND (s.name, s.waiting, s.qr_md5) IS DISTINCT FROM
           (x.name, x.waiting, CASE WHEN x.starts OR x.moved THEN NULL ELSE s.qr_md5 END);
    -- a schedule row lost with a crash comes back here
    INSERT INTO pgqr.schedule (key) SELECT x.key FROM unnest(d) x ON CONFLICT (key) DO NOTHING;
    UPDATE pgqr.schedule q
       SET claim_id = NULL, lease_owner = NULL, lease_expires_at = NULL,
           qr_alive_at = CASE WHEN x.starts OR x.moved THEN NULL ELSE q.qr_alive_at END,
           due_at = CASE WHEN NOT x.waiting THEN NULL
                         WHEN x.starts OR x.moved OR x.renamed OR q.due_at IS NULL
                         THEN greatest(now(), pgqr.poll_floor(q.recent_polls)) ELSE q.due_at END,
           consecutive_failures = CASE WHEN x.starts THEN 0 ELSE q.consecutive_failures END,
           repeats = CASE WHEN x.starts THEN 0 ELSE q.repeats END
      FROM unnest(d) x
     WHERE q.key = x.key;
    RETURN QUERY SELECT x.key, x.starts FROM unnest(d) x;
    RETURN QUERY SELECT x.key, x.waiting FROM unnest(c) x WHERE x.key = ANY(added);
END
$$;

-- Bring pgqr.instance_state and pgqr.schedule in step with the app's rows: rows written with triggers off (a bulk
-- load, session_replication_role = replica), rows that existed before binding, a schedule lost with a crash.
-- Run by every tick.
CREATE OR REPLACE FUNCTION pgqr.sync_instances() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
    changed integer;
BEGIN
    SELECT count(*) INTO changed FROM pgqr.track(ARRAY(
        SELECT ROW(a.key, coalesce(a.name, ''), coalesce(a.waiting, false), false)::pgqr.app_change
        FROM pgqr.app_instances a LEFT JOIN pgqr.instance_state s ON s.key = a.key
        WHERE s.key IS NULL OR s.name IS DISTINCT FROM coalesce(a.name, '')
           OR s.waiting IS DISTINCT FROM coalesce(a.waiting, false)));
    DELETE FROM pgqr.schedule q WHERE NOT EXISTS (SELECT 1 FROM pgqr.app_instances a WHERE a.key = q.key);
    DELETE FROM pgqr.instance_state s WHERE NOT EXISTS (SELECT 1 FROM pgqr.app_instances a WHERE a.key = s.key);
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM pgqr.rebuild_schedule();
    RETURN changed + n;
END
$$;

-- The binding's view and the functions that read and lock the app's rows (0003's, without the trigger, which
-- install_trigger makes).
CREATE OR REPLACE FUNCTION pgqr.install_app_access(b pgqr.binding) RETURNS void
LANGUAGE plpgsql AS $gen$
DECLARE
    tbl      text := pgqr.qualified(to_regclass(b.table_name));
    waiting  text := format('%s = ANY(%L::text[])', pgqr.bound(b.status_column), b.waiting_values);
    cols     text;
    key_eq   text := format('t.%I = ANY(keys::%s[])', b.key_column, b.key_type);
BEGIN
    cols := format('%s AS key, %s AS name, %s AS status, %s AS token, %s AS url, %s AS qr, %s AS qr_at, '
                   '%s AS pairing_code, %s AS phone, %s AS waiting',
                   pgqr.bound(b.key_column), pgqr.bound(b.name_column), pgqr.bound(b.status_column),
                   pgqr.bound(b.token_column), pgqr.bound(b.url_column), pgqr.bound(b.qr_column),
                   pgqr.bound(b.qr_at_column, 'timestamptz'), pgqr.bound(b.pairing_column),
                   pgqr.bound(b.phone_column), waiting);
    EXECUTE format('CREATE OR REPLACE VIEW pgqr.app_instances AS SELECT %s FROM %s t', cols, tbl);
    EXECUTE format($f$CREATE OR REPLACE FUNCTION pgqr.app_rows(keys text[]) RETURNS SETOF pgqr.app_instances
                      LANGUAGE sql STABLE AS 'SELECT %s FROM %s t WHERE %s'$f$,
                   replace(cols, '''', ''''''), tbl, replace(key_eq, '''', ''''''));
    -- SKIP LOCKED: a row the app holds costs that one instance this write (it is retried), never the batch
    EXECUTE format($f$CREATE OR REPLACE FUNCTION pgqr.app_lock(keys text[]) RETURNS SETOF text
                      LANGUAGE sql AS 'SELECT t.%I::text FROM %s t WHERE %s AND %s FOR UPDATE OF t SKIP LOCKED'$f$,
                   b.key_column, tbl, replace(key_eq, '''', ''''''), replace(waiting, '''', ''''''));
END
$gen$;

-- The writes, one UPDATE per kind, each guarded by the app's own status: a row the app has moved out of waiting
-- never gets a QR or a status from pgqr. The status column is only SET where it changes, so the app's own UPDATE
-- OF triggers fire only then; a QR is not written to a row that already holds that image (the first poll after
-- a restart brings what the row has): the image columns decide, or the expiry column when no image column is
-- bound.
CREATE FUNCTION pgqr.install_app_write(b pgqr.binding) RETURNS void
LANGUAGE plpgsql AS $gen$
DECLARE
    tbl     text := pgqr.qualified(to_regclass(b.table_name));
    waiting text := format('%s = ANY(%L::text[])', pgqr.bound(b.status_column), b.waiting_values);
    sets    text;
    olds    text[];
    news    text[];
    body    text := '';
BEGIN
    sets := concat_ws(', ',
        CASE WHEN b.qr_column IS NOT NULL THEN format('%I = coalesce(w.qr, t.%I)', b.qr_column, b.qr_column) END,
        CASE WHEN b.qr_at_column IS NOT NULL THEN format('%I = w.qr_at', b.qr_at_column) END,
        CASE WHEN b.qr_expires_column IS NOT NULL THEN format('%I = w.qr_expires_at', b.qr_expires_column) END,
        CASE WHEN b.pairing_column IS NOT NULL THEN format('%I = w.pairing_code', b.pairing_column) END);
    IF b.qr_column IS NOT NULL OR b.pairing_column IS NOT NULL THEN
        olds := array_remove(ARRAY[CASE WHEN b.qr_column IS NOT NULL THEN format('t.%I::text', b.qr_column) END,
                                   CASE WHEN b.pairing_column IS NOT NULL
                                        THEN format('t.%I::text', b.pairing_column) END], NULL);
        news := array_remove(ARRAY[CASE WHEN b.qr_column IS NOT NULL
                                        THEN format('coalesce(w.qr, t.%I::text)', b.qr_column) END,
                                   CASE WHEN b.pairing_column IS NOT NULL THEN 'w.pairing_code' END], NULL);
    ELSIF b.qr_expires_column IS NOT NULL THEN
        olds := ARRAY[format('t.%I::timestamptz', b.qr_expires_column)];
        news := ARRAY['w.qr_expires_at'];
    END IF;
    IF sets <> '' THEN
        body := body || format('UPDATE %s t SET %s FROM unnest(writes) w WHERE w.kind = ''qr'' AND t.%I = w.key::%s '
                               'AND %s%s; ',
                               tbl, sets, b.key_column, b.key_type, waiting,
                               CASE WHEN olds IS NOT NULL
                                    THEN format(' AND ROW(%s, 0) IS DISTINCT FROM ROW(%s, 0)',
                                                array_to_string(olds, ', '), array_to_string(news, ', '))
                                    ELSE '' END);
    END IF;
    sets := concat_ws(', ',
        format('%I = %L::%s', b.status_column, b.connected_value, b.status_type),
        CASE WHEN b.qr_column IS NOT NULL THEN format('%I = NULL', b.qr_column) END,
        CASE WHEN b.pairing_column IS NOT NULL THEN format('%I = NULL', b.pairing_column) END);
    body := body || format('UPDATE %s t SET %s FROM unnest(writes) w WHERE w.kind = ''connected'' AND t.%I = w.key::%s AND %s; ',
                           tbl, sets, b.key_column, b.key_type, waiting);
    IF b.gave_up_value IS NOT NULL THEN
        body := body || format('UPDATE %s t SET %I = %L::%s FROM unnest(writes) w WHERE w.kind = ''gave_up'' AND t.%I = w.key::%s AND %s; ',
                               tbl, b.status_column, b.gave_up_value, b.status_type, b.key_column, b.key_type, waiting);
    END IF;
    EXECUTE format('CREATE OR REPLACE FUNCTION pgqr.app_write(writes pgqr.app_write[]) RETURNS SETOF text '
                   'LANGUAGE plpgsql AS %L',
                   'BEGIN ' || body || 'RETURN QUERY SELECT w.key FROM unnest(writes) w; END');
END
$gen$;

-- The trigger on the app's table: 0009's, and a deleted row's schedule goes with it (schedule row first: the
-- lock order every writer keeps).
CREATE OR REPLACE FUNCTION pgqr.install_trigger(b pgqr.binding) RETURNS void
LANGUAGE plpgsql AS $gen$
DECLARE
    tbl    text := pgqr.qualified(to_regclass(b.table_name));
    target text[] := array_remove(ARRAY[b.name_column, b.url_column, b.token_column], NULL);
    moved  text;
BEGIN
    moved := format('ROW(%s) IS DISTINCT FROM ROW(%s)',
                    (SELECT string_agg(format('OLD.%I::text', c), ', ') FROM unnest(target) c),
                    (SELECT string_agg(format('NEW.%I::text', c), ', ') FROM unnest(target) c));
    -- It runs as pgqr's owner with a pinned search_path (an app role such as Supabase's `authenticated` has no
    -- rights on schema pgqr) and never aborts the app's statement: an error becomes a WARNING and a row in
    -- pgqr.trigger_errors.
    EXECUTE format($trg$
        CREATE OR REPLACE FUNCTION pgqr.on_app_change() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgqr AS $body$
        DECLARE
            k text;
        BEGIN
            BEGIN
                IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND OLD.%1$I::text IS DISTINCT FROM NEW.%1$I::text) THEN
                    DELETE FROM pgqr.schedule WHERE key = OLD.%1$I::text;
                    DELETE FROM pgqr.instance_state WHERE key = OLD.%1$I::text;
                    IF TG_OP = 'DELETE' THEN
                        RETURN NULL;
                    END IF;
                END IF;
                k := NEW.%1$I::text;
                IF EXISTS (SELECT 1 FROM pgqr.track(ARRAY[ROW(
                        k, NEW.%4$I::text, coalesce(NEW.%2$I::text = ANY(%3$L::text[]), false),
                        TG_OP = 'UPDATE' AND %5$s)::pgqr.app_change]) t WHERE t.started) THEN
                    -- the key, not the name: a NOTIFY payload over 8000 bytes would fail the app's statement
                    PERFORM pg_notify('pgqr_refresh', json_build_object('reason', 'waiting', 'key', left(k, 200))::text);
                END IF;
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'pgqr: bookkeeping for a row of %% failed (%%); the statement goes on', TG_TABLE_NAME, SQLERRM;
                BEGIN
                    INSERT INTO pgqr.trigger_errors (message) VALUES (left(SQLERRM, 500));
                EXCEPTION WHEN OTHERS THEN
                    NULL;
                END;
            END;
            RETURN NULL;
        END
        $body$$trg$, b.key_column, b.status_column, b.waiting_values, b.name_column, moved);
    EXECUTE format('DROP TRIGGER IF EXISTS pgqr_instance_change ON %s', tbl);
    -- the key may also be the name (a table keyed by instance name): UPDATE OF refuses a column named twice
    EXECUTE format('CREATE TRIGGER pgqr_instance_change AFTER INSERT OR DELETE OR UPDATE OF %s ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION pgqr.on_app_change()',
                   (SELECT string_agg(DISTINCT quote_ident(c), ', ')
                    FROM unnest(ARRAY[b.key_column, b.status_column] || target) c), tbl);
END
$gen$;

CREATE OR REPLACE FUNCTION pgqr.install_binding(b pgqr.binding) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgqr.install_app_access(b);
    PERFORM pgqr.install_app_write(b);
    PERFORM pgqr.install_trigger(b);
END
$$;

-- Housekeeping (0008's) also prunes the counts.
CREATE OR REPLACE FUNCTION pgqr.housekeeping()
RETURNS TABLE (what text, deleted bigint)
LANGUAGE plpgsql AS $$
DECLARE
    cutoff timestamptz := now() - pgqr.setting('retention')::interval;
    n bigint;
BEGIN
    DELETE FROM pgqr.refresh_log WHERE at < cutoff;
    GET DIAGNOSTICS n = ROW_COUNT;
    what := 'refresh_log'; deleted := n; RETURN NEXT;

    DELETE FROM pgqr.refresh_counts WHERE minute < cutoff;
    GET DIAGNOSTICS n = ROW_COUNT;
    what := 'refresh_counts'; deleted := n; RETURN NEXT;

    DELETE FROM pgqr.ticks WHERE at < cutoff;
    GET DIAGNOSTICS n = ROW_COUNT;
    what := 'ticks'; deleted := n; RETURN NEXT;

    DELETE FROM pgqr.alerts a
     WHERE a.state = 'resolved' AND a.resolved_at < cutoff
       AND NOT EXISTS (SELECT 1 FROM pgqr.alert_deliveries d
                        WHERE d.alert_id = a.id AND d.delivered_at IS NULL AND d.given_up_at IS NULL);
    GET DIAGNOSTICS n = ROW_COUNT;
    what := 'alerts'; deleted := n; RETURN NEXT;

    -- every restart of `pgqr run` adds a row; keep the recent ones for the no_listener alert's detail
    DELETE FROM pgqr.listener_heartbeats WHERE coalesce(stopped_at, heartbeat_at) < cutoff;
    GET DIAGNOSTICS n = ROW_COUNT;
    what := 'listener_heartbeats'; deleted := n; RETURN NEXT;

    DELETE FROM pgqr.trigger_errors WHERE at < cutoff;
    GET DIAGNOSTICS n = ROW_COUNT;
    what := 'trigger_errors'; deleted := n; RETURN NEXT;
END
$$;

-- An existing binding gets the new write guard and trigger now.
SELECT pgqr.install_binding(b) FROM pgqr.binding b WHERE to_regclass(b.table_name) IS NOT NULL;
