-- pgqr 0006: alert rules in SQL and their incidents. Thresholds live in pgqr.settings (0001); change them
-- with UPDATE. Transitions go to the delivery outbox (0007).

-- Waiting instances without a working QR for longer than `threshold`: measured from the later of the QR's
-- estimated expiry and the moment the instance (re)turned waiting, so one that never got a QR is stale once
-- it has waited that long.
CREATE FUNCTION pgqr.stale_instances(threshold interval DEFAULT '5 minutes')
RETURNS TABLE (instance_key text, instance_name text, last_qr_update timestamptz, qr_expires_at timestamptz,
               waiting interval, last_attempt_at timestamptz, last_outcome pgqr.outcome, last_error_class text,
               consecutive_failures integer)
LANGUAGE sql STABLE AS $$
    SELECT s.key, s.name, s.qr_seen_at, s.qr_expires_at,
           now() - greatest(s.qr_expires_at, s.connecting_since),
           s.last_attempt_at, s.last_outcome, s.last_error_class, s.consecutive_failures
    FROM pgqr.instance_state s
    WHERE s.waiting
      AND greatest(s.qr_expires_at, s.connecting_since) < now() - threshold
    ORDER BY greatest(s.qr_expires_at, s.connecting_since), s.name
$$;

-- '5 minutes', '90 seconds', '2 hours 5 minutes', '3 days': for alert details humans read.
CREATE FUNCTION pgqr.human_interval(d interval) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN s < 120 THEN format('%s seconds', s)
        WHEN s < 7200 THEN format('%s minutes', s / 60)
        WHEN s < 172800 THEN format('%s hours %s minutes', s / 3600, s % 3600 / 60)
        ELSE format('%s days', s / 86400) END
    FROM (SELECT greatest(floor(extract(epoch FROM d)), 0)::bigint AS s) x
$$;

-- One row per alert incident: inserted when a rule starts firing, updated while it fires (count, detail,
-- checked_at: no notification), closed when it resolves.
CREATE TABLE pgqr.alerts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule        text NOT NULL,
    state       text NOT NULL CHECK (state IN ('firing', 'resolved')),
    count       integer NOT NULL,
    detail      text NOT NULL,
    fired_at    timestamptz NOT NULL DEFAULT now(),
    checked_at  timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    CHECK ((state = 'resolved') = (resolved_at IS NOT NULL))
);
CREATE UNIQUE INDEX alerts_one_firing_per_rule ON pgqr.alerts (rule) WHERE state = 'firing';
CREATE INDEX alerts_resolved_at_idx ON pgqr.alerts (resolved_at) WHERE state = 'resolved';

-- Evaluate every rule now, changing nothing (psql: SELECT * FROM pgqr.alert_rules()). `count` per rule:
--   stale_qr            connecting instances with a stale QR (pgqr.stale_instances)
--   no_listener         listeners that went silent without stopping (0 when none ever ran or all stopped)
--   ticks_not_firing    whole minutes since the last tick
--   evolution_failures  failed Evolution calls in the window
--
-- First-ever evaluation: before any listener has sent a heartbeat or pg_cron has ticked, the time pgqr was
-- installed (the first row of pgqr.migrations) stands in for the last sign of life. A fresh install thus
-- gets the rule's threshold as grace (pg_cron ticks within a minute; the listener is being deployed), and
-- after that a listener that was never started or a pg_cron that never ran does fire: from the outside it
-- looks exactly like one that died, and QR codes go stale either way. A listener that stopped cleanly counts
-- as a sign of life until it stopped, so a rolling restart does not fire, but an intended stop of every
-- listener for longer than the threshold does: nobody is refreshing QR codes then.

-- One view per rule, each one row (rule, firing, count, detail); pgqr.alert_rules() combines them.
-- When pgqr was installed (the first row of pgqr.migrations) stands in for the last sign of life, as above.
CREATE VIEW pgqr.alert_stale_qr AS
SELECT 'stale_qr'::text AS rule,
       x.n > 0 AS firing,
       x.n AS count,
       CASE WHEN x.n > 0
            THEN format('%s connecting instance(s) without a QR refreshed in the last %s: %s%s',
                        x.n, pgqr.human_interval(x.threshold), left(x.names, 600),
                        CASE WHEN x.n > 10 THEN ', ...' ELSE '' END)
            ELSE format('every connecting instance has a QR refreshed in the last %s',
                        pgqr.human_interval(x.threshold)) END AS detail
FROM (SELECT t.threshold, count(st.instance_name)::integer AS n,
             string_agg(st.instance_name, ', ' ORDER BY st.rn) FILTER (WHERE st.rn <= 10) AS names
      FROM (SELECT pgqr.setting('alert_stale_after')::interval AS threshold) t
      LEFT JOIN LATERAL (SELECT y.instance_name, row_number() OVER () AS rn
                         FROM pgqr.stale_instances(t.threshold) y) st ON true
      GROUP BY t.threshold) x;

CREATE VIEW pgqr.alert_no_listener AS
SELECT 'no_listener'::text AS rule,
       x.live = 0 AND coalesce(x.last_seen, x.installed) < now() - x.threshold AS firing,
       x.silent AS count,
       CASE WHEN x.live > 0 THEN format('%s live listener(s)', x.live)
            WHEN x.last_seen IS NULL THEN format(
                'no listener has ever connected (pgqr installed %s ago): start `pgqr run`',
                pgqr.human_interval(now() - x.installed))
            ELSE format('no live listener: last heartbeat %s ago, %s silent without stopping: start `pgqr run`',
                        pgqr.human_interval(now() - x.last_seen), x.silent) END AS detail
FROM (SELECT t.threshold, t.installed,
             (SELECT count(*) FROM pgqr.listener_heartbeats l
               WHERE l.stopped_at IS NULL AND l.heartbeat_at >= now() - t.threshold)::integer AS live,
             (SELECT count(*) FROM pgqr.listener_heartbeats l
               WHERE l.stopped_at IS NULL AND l.heartbeat_at < now() - t.threshold)::integer AS silent,
             (SELECT max(coalesce(l.stopped_at, l.heartbeat_at)) FROM pgqr.listener_heartbeats l) AS last_seen
      FROM (SELECT pgqr.setting('alert_listener_after')::interval AS threshold,
                   coalesce((SELECT min(applied_at) FROM pgqr.migrations), now()) AS installed) t) x;

-- A paused tick job is not a broken one; the threshold grows with a slower tick schedule.
CREATE VIEW pgqr.alert_ticks_not_firing AS
SELECT 'ticks_not_firing'::text AS rule,
       coalesce(x.tick_on, false) AND x.age > x.threshold AS firing,
       floor(extract(epoch FROM x.age) / 60)::integer AS count,
       CASE WHEN NOT coalesce(x.tick_on, false) THEN 'the pgqr-tick job is paused'
            WHEN x.last_seen IS NULL THEN format(
                'no tick yet, pgqr installed %s ago: is pg_cron running? (pgqr doctor)', pgqr.human_interval(x.age))
            ELSE format('last tick %s ago%s', pgqr.human_interval(x.age),
                        CASE WHEN x.age > x.threshold THEN ': is pg_cron running? (pgqr doctor)' ELSE '' END)
       END AS detail
FROM (SELECT y.*, now() - coalesce(y.last_seen, y.installed) AS age
      FROM (SELECT (SELECT j.active FROM pgqr.jobs j WHERE j.name = 'pgqr-tick') AS tick_on,
                   greatest(pgqr.setting('alert_tick_after')::interval,
                            3 * coalesce(pgqr.setting('tick_every')::interval, interval '1 minute')) AS threshold,
                   (SELECT max(k.at) FROM pgqr.ticks k) AS last_seen,
                   coalesce((SELECT min(applied_at) FROM pgqr.migrations), now()) AS installed) y) x;

CREATE VIEW pgqr.alert_evolution_failures AS
SELECT 'evolution_failures'::text AS rule,
       x.calls >= x.min_calls AND coalesce(x.failures::float8 / nullif(x.calls, 0) > x.max_rate, false) AS firing,
       x.failures AS count,
       format('%s of %s Evolution calls failed in the last %s (%s%%, threshold %s%%)%s',
              x.failures, x.calls, pgqr.human_interval(x.threshold),
              CASE WHEN x.calls > 0 THEN round(100.0 * x.failures / x.calls) ELSE 0 END,
              round((100 * x.max_rate)::numeric), coalesce(': ' || x.classes, '')) AS detail
FROM (SELECT y.*,
             (SELECT count(*) FROM pgqr.refresh_log l
               WHERE l.source = 'poll' AND l.at >= now() - y.threshold)::integer AS calls,
             (SELECT count(*) FROM pgqr.refresh_log l
               WHERE l.source = 'poll' AND l.outcome = 'failed' AND l.at >= now() - y.threshold)::integer AS failures,
             (SELECT string_agg(format('%s %s', c.error_class, c.n), ', ' ORDER BY c.n DESC, c.error_class)
                FROM (SELECT coalesce(l.error_class, 'unknown') AS error_class, count(*) AS n
                        FROM pgqr.refresh_log l
                       WHERE l.source = 'poll' AND l.outcome = 'failed' AND l.at >= now() - y.threshold
                       GROUP BY 1) c) AS classes
      FROM (SELECT pgqr.setting('alert_failure_window')::interval AS threshold,
                   pgqr.setting('alert_failure_rate')::float8 AS max_rate,
                   pgqr.setting('alert_failure_min_calls')::integer AS min_calls) y) x;

CREATE FUNCTION pgqr.alert_rules()
RETURNS TABLE (rule text, firing boolean, count integer, detail text)
LANGUAGE sql STABLE AS $$
    SELECT * FROM pgqr.alert_stale_qr
    UNION ALL SELECT * FROM pgqr.alert_no_listener
    UNION ALL SELECT * FROM pgqr.alert_ticks_not_firing
    UNION ALL SELECT * FROM pgqr.alert_evolution_failures
$$;

-- Run by the pg_cron job pgqr-alerts. Records transitions in pgqr.alerts and, only on a transition, queues
-- it in pgqr.alert_deliveries (same transaction), RAISEs a WARNING (pg_cron's server log) and sends NOTIFY
-- pgqr_alert with {"rule", "state": "firing"|"resolved", "count", "detail", "database", "at"}: for humans
-- LISTENing in psql, and to wake the listeners that deliver the outbox to PGQR_ALERT_WEBHOOK_URL. Calling it
-- again with nothing changed notifies nothing. Returned `state` is 'firing', 'resolved' (just now) or 'ok'.
CREATE FUNCTION pgqr.check_alerts()
RETURNS TABLE (rule text, state text, count integer, detail text, changed boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r       record;
    open_id bigint;
    body    jsonb;
BEGIN
    -- Two concurrent evaluations (pg_cron and a human in psql) would both see "not firing yet" and both
    -- notify; serialise them for the rest of this transaction.
    PERFORM pg_advisory_xact_lock(1885827442, 1);  -- 0x70677172, "pgqr" as in the migration lock
    FOR r IN SELECT * FROM pgqr.alert_rules() LOOP
        SELECT a.id INTO open_id FROM pgqr.alerts a WHERE a.rule = r.rule AND a.state = 'firing';
        changed := false;
        IF r.firing AND open_id IS NULL THEN
            INSERT INTO pgqr.alerts (rule, state, count, detail) VALUES (r.rule, 'firing', r.count, r.detail)
            RETURNING id INTO open_id;
            state := 'firing';
            changed := true;
        ELSIF r.firing THEN
            UPDATE pgqr.alerts a SET count = r.count, detail = r.detail, checked_at = now() WHERE a.id = open_id;
            state := 'firing';
        ELSIF open_id IS NOT NULL THEN
            UPDATE pgqr.alerts a SET state = 'resolved', resolved_at = now(), checked_at = now()
             WHERE a.id = open_id;
            state := 'resolved';
            changed := true;
        ELSE
            state := 'ok';
        END IF;
        rule := r.rule;
        count := r.count;
        detail := r.detail;
        IF changed THEN
            body := jsonb_build_object(
                'rule', r.rule, 'state', state, 'count', r.count, 'detail', left(r.detail, 2000),
                'database', current_database(), 'at', now());
            INSERT INTO pgqr.alert_deliveries (alert_id, rule, state, payload)
            VALUES (open_id, r.rule, state, body);
            RAISE WARNING 'pgqr alert % %: %', r.rule, state, r.detail;
            PERFORM pg_notify('pgqr_alert', body::text);
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;

