-- pgqr 0005: alert rules in SQL, their delivery outbox, housekeeping, and the control functions
-- `pgqr status/schedule/pause/resume` wrap. Thresholds live in pgqr.settings (0004); change them with UPDATE.

-- Connecting instances whose QR has not been refreshed within `threshold`, measured from the later of the
-- last QR and the moment the instance (re)turned connecting: one that never got a QR is stale once it has
-- waited that long. An instance without a bookkeeping row yet (claim or the trigger adds it within seconds)
-- is not counted.
CREATE FUNCTION pgqr.stale_instances(threshold interval DEFAULT '5 minutes')
RETURNS TABLE (instance_id text, instance_name text, last_qr_update timestamptz, waiting interval,
               last_attempt_at timestamptz, last_outcome text, last_error_class text,
               consecutive_failures integer)
LANGUAGE sql STABLE AS $$
    SELECT i.id::text, i.instance_name, i.last_qr_update, now() - greatest(i.last_qr_update, s.connecting_since),
           s.last_attempt_at, s.last_outcome, s.last_error_class, s.consecutive_failures
    FROM public.evolution_instances i
    JOIN pgqr.instance_state s ON s.instance_name = i.instance_name
    WHERE i.instance_status = 'connecting'
      AND greatest(i.last_qr_update, s.connecting_since) < now() - threshold
    ORDER BY greatest(i.last_qr_update, s.connecting_since), i.instance_name
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

-- The rows are the truth; NOTIFY pgqr_alert is only a wake-up. check_alerts() writes every transition
-- into an outbox, pgqr.alert_deliveries, in the same transaction as the transition itself. Listeners with
-- PGQR_ALERT_WEBHOOK_URL claim undelivered rows (on each pgqr_alert NOTIFY, after every (re)connect and on
-- a timer) and POST the payload stored on the row, never a NOTIFY payload: a forged `NOTIFY pgqr_alert`
-- can at most make listeners look at the table, a transition made while no listener was connected is
-- delivered when one connects, and SKIP LOCKED plus a lease means two replicas never both send one.

-- One row per transition to deliver. `payload` is the JSON body POSTed, fixed when the transition happened
-- (a resolved payload carries the count and detail of the moment it resolved, which pgqr.alerts does not keep).
-- A row is pending (delivered_at and given_up_at NULL), claimed while lease_until is in the future, and
-- finally delivered or given up. Deleted with its alert (housekeeping), never on its own.
CREATE TABLE pgqr.alert_deliveries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id        bigint NOT NULL REFERENCES pgqr.alerts (id) ON DELETE CASCADE,
    rule            text NOT NULL,
    state           text NOT NULL CHECK (state IN ('firing', 'resolved')),
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,      -- claims that ended in a failure or are in flight
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_owner     text,
    lease_until     timestamptz,
    delivered_at    timestamptz,
    given_up_at     timestamptz,
    last_error      text,
    UNIQUE (alert_id, state),
    CHECK (delivered_at IS NULL OR given_up_at IS NULL)
);
CREATE INDEX alert_deliveries_pending_idx ON pgqr.alert_deliveries (rule, id)
    WHERE delivered_at IS NULL AND given_up_at IS NULL;

INSERT INTO pgqr.settings (key, value, description) VALUES
    ('alert_delivery_lease', '2 minutes',
     'How long a listener holds a claimed alert delivery (all its in-process retries); then another may take it.'),
    ('alert_delivery_retry_after', '30 seconds',
     'After a failed delivery round, wait this long before the next; doubles per round, capped at 30 minutes.'),
    ('alert_delivery_max_attempts', '12',
     'Delivery rounds before an alert is given up (a WARNING, given_up_at set); about 3 hours with the defaults.')
ON CONFLICT (key) DO NOTHING;


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
CREATE FUNCTION pgqr.alert_rules()
RETURNS TABLE (rule text, firing boolean, count integer, detail text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    installed  timestamptz := coalesce((SELECT min(applied_at) FROM pgqr.migrations), now());
    threshold  interval;
    n          integer;
    silent     integer;
    names      text;
    last_seen  timestamptz;
    age        interval;
    calls      integer;
    failures   integer;
    classes    text;
    max_rate   float8;
    tick_on    boolean;
BEGIN
    threshold := pgqr.setting('alert_stale_after')::interval;
    SELECT count(*)::integer,
           string_agg(x.instance_name, ', ' ORDER BY x.rn) FILTER (WHERE x.rn <= 10)
      INTO n, names
      FROM (SELECT st.instance_name, row_number() OVER () AS rn
              FROM pgqr.stale_instances(threshold) st) x;
    rule := 'stale_qr';
    firing := n > 0;
    count := n;
    detail := CASE WHEN n > 0
        THEN format('%s connecting instance(s) without a QR refreshed in the last %s: %s%s',
                    n, pgqr.human_interval(threshold), left(names, 600),
                    CASE WHEN n > 10 THEN ', ...' ELSE '' END)
        ELSE format('every connecting instance has a QR refreshed in the last %s',
                    pgqr.human_interval(threshold)) END;
    RETURN NEXT;

    threshold := pgqr.setting('alert_listener_after')::interval;
    SELECT count(*) FILTER (WHERE l.stopped_at IS NULL AND l.heartbeat_at >= now() - threshold)::integer,
           count(*) FILTER (WHERE l.stopped_at IS NULL AND l.heartbeat_at < now() - threshold)::integer,
           max(coalesce(l.stopped_at, l.heartbeat_at))
      INTO n, silent, last_seen
      FROM pgqr.listener_heartbeats l;
    rule := 'no_listener';
    firing := n = 0 AND coalesce(last_seen, installed) < now() - threshold;
    count := silent;
    detail := CASE
        WHEN n > 0 THEN format('%s live listener(s)', n)
        WHEN last_seen IS NULL THEN format(
            'no listener has ever connected (pgqr installed %s ago): start `pgqr run`',
            pgqr.human_interval(now() - installed))
        ELSE format('no live listener: last heartbeat %s ago, %s silent without stopping: start `pgqr run`',
                    pgqr.human_interval(now() - last_seen), silent) END;
    RETURN NEXT;

    -- A paused tick job is not a broken one; the threshold grows with a slower tick schedule.
    SELECT j.active INTO tick_on FROM pgqr.jobs j WHERE j.name = 'pgqr-tick';
    threshold := greatest(pgqr.setting('alert_tick_after')::interval,
                          3 * coalesce(pgqr.setting('tick_every')::interval, interval '1 minute'));
    SELECT max(k.at) INTO last_seen FROM pgqr.ticks k;
    age := now() - coalesce(last_seen, installed);
    rule := 'ticks_not_firing';
    firing := coalesce(tick_on, false) AND age > threshold;
    count := floor(extract(epoch FROM age) / 60)::integer;
    detail := CASE
        WHEN NOT coalesce(tick_on, false) THEN 'the pgqr-tick job is paused'
        WHEN last_seen IS NULL THEN format(
            'no tick yet, pgqr installed %s ago: is pg_cron running? (pgqr doctor)',
            pgqr.human_interval(age))
        ELSE format('last tick %s ago%s', pgqr.human_interval(age),
                    CASE WHEN age > threshold THEN ': is pg_cron running? (pgqr doctor)' ELSE '' END) END;
    RETURN NEXT;

    threshold := pgqr.setting('alert_failure_window')::interval;
    max_rate := pgqr.setting('alert_failure_rate')::float8;
    SELECT count(*)::integer, count(*) FILTER (WHERE l.outcome = 'failed')::integer
      INTO calls, failures
      FROM pgqr.refresh_log l
     WHERE l.source = 'poll' AND l.at >= now() - threshold;
    SELECT string_agg(format('%s %s', c.error_class, c.n), ', ' ORDER BY c.n DESC, c.error_class)
      INTO classes
      FROM (SELECT coalesce(l.error_class, 'unknown') AS error_class, count(*) AS n
              FROM pgqr.refresh_log l
             WHERE l.source = 'poll' AND l.outcome = 'failed' AND l.at >= now() - threshold
             GROUP BY 1) c;
    rule := 'evolution_failures';
    firing := calls >= pgqr.setting('alert_failure_min_calls')::integer
              AND coalesce(failures::float8 / nullif(calls, 0) > max_rate, false);
    count := failures;
    detail := format('%s of %s Evolution calls failed in the last %s (%s%%, threshold %s%%)%s',
                     failures, calls, pgqr.human_interval(threshold),
                     CASE WHEN calls > 0 THEN round(100.0 * failures / calls) ELSE 0 END,
                     round((100 * max_rate)::numeric), coalesce(': ' || classes, ''));
    RETURN NEXT;
END
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

-- Claim up to `max` deliveries for `owner` (a listener id) and return their payloads; the caller POSTs
-- each and reports back with pgqr.finish_alert_delivery(). A pending delivery is claimable once its
-- next_attempt_at has come and no lease on it is live (an expired lease, from a listener that died
-- mid-delivery, makes it claimable again). FOR UPDATE SKIP LOCKED plus the lease committed with the claim
-- mean two listeners never both get one. Per rule, transitions go out in order: a delivery waits while an
-- earlier one of the same rule is still pending (so "resolved" never overtakes its "firing"); a given-up
-- delivery no longer holds the rule back.
CREATE FUNCTION pgqr.claim_alert_deliveries(owner text, max integer DEFAULT 10)
RETURNS TABLE (id bigint, rule text, state text, attempts integer, payload jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH due AS (
        SELECT d.id
          FROM pgqr.alert_deliveries d
         WHERE d.delivered_at IS NULL AND d.given_up_at IS NULL
           AND d.next_attempt_at <= now()
           AND (d.lease_until IS NULL OR d.lease_until <= now())
           AND NOT EXISTS (
               SELECT 1 FROM pgqr.alert_deliveries e
                WHERE e.rule = d.rule AND e.id < d.id
                  AND e.delivered_at IS NULL AND e.given_up_at IS NULL)
         ORDER BY d.id
         LIMIT greatest(max, 0)
           FOR UPDATE SKIP LOCKED
    )
    UPDATE pgqr.alert_deliveries d
       SET lease_owner = owner,
           lease_until = now() + pgqr.setting('alert_delivery_lease')::interval,
           attempts = d.attempts + 1
      FROM due
     WHERE d.id = due.id
    RETURNING d.id, d.rule, d.state, d.attempts, d.payload;
END
$$;

-- The end of one claimed delivery, guarded by the lease owner (a listener whose lease expired and was
-- taken over changes nothing; returns false then). outcome:
--   'delivered'  the endpoint accepted it (2xx): never sent again.
--   'failed'     the listener's in-process retries are exhausted: the claim is released, and the delivery
--                is claimable again after alert_delivery_retry_after * 2^(attempts-1) (capped at 30
--                minutes) by any listener, on its next wake-up or timer. After alert_delivery_max_attempts
--                failed rounds it is given up: given_up_at is set, a WARNING is raised, it is never sent
--                and no longer holds back later transitions of its rule. It stays in the table
--                (last_error says why) until housekeeping prunes its alert.
--   'released'   the listener is stopping mid-delivery: the claim is given back, not counted as an attempt,
--                claimable again at once.
CREATE FUNCTION pgqr.finish_alert_delivery(delivery_id bigint, owner text, outcome text, error text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    d       pgqr.alert_deliveries;
    cap     integer := pgqr.setting('alert_delivery_max_attempts')::integer;
    delay   interval;
BEGIN
    IF outcome NOT IN ('delivered', 'failed', 'released') THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('outcome must be delivered, failed or released, not %s', outcome);
    END IF;
    SELECT * INTO d FROM pgqr.alert_deliveries x
     WHERE x.id = delivery_id AND x.lease_owner = owner AND x.delivered_at IS NULL AND x.given_up_at IS NULL
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF outcome = 'delivered' THEN
        UPDATE pgqr.alert_deliveries x SET delivered_at = now(), lease_owner = NULL, lease_until = NULL
         WHERE x.id = d.id;
    ELSIF outcome = 'released' THEN
        UPDATE pgqr.alert_deliveries x
           SET attempts = greatest(x.attempts - 1, 0), lease_owner = NULL, lease_until = NULL
         WHERE x.id = d.id;
    ELSIF d.attempts >= cap THEN
        UPDATE pgqr.alert_deliveries x
           SET given_up_at = now(), last_error = left(error, 200), lease_owner = NULL, lease_until = NULL
         WHERE x.id = d.id;
        RAISE WARNING 'pgqr alert % % not delivered after % attempts, given up: %',
            d.rule, d.state, d.attempts, coalesce(error, 'unknown error');
    ELSE
        delay := least(pgqr.setting('alert_delivery_retry_after')::interval * 2 ^ least(d.attempts - 1, 20),
                       interval '30 minutes');
        UPDATE pgqr.alert_deliveries x
           SET next_attempt_at = now() + delay, last_error = left(error, 200),
               lease_owner = NULL, lease_until = NULL
         WHERE x.id = d.id;
    END IF;
    RETURN true;
END
$$;

-- Seconds until a pending delivery becomes claimable (0 when one is now), NULL when none is pending: how
-- long a listener may sleep before looking again.
CREATE FUNCTION pgqr.next_alert_delivery_in() RETURNS float8
LANGUAGE sql STABLE AS $$
    SELECT greatest(extract(epoch FROM min(greatest(d.next_attempt_at, coalesce(d.lease_until, d.next_attempt_at)))
                                       - now()), 0)::float8
      FROM pgqr.alert_deliveries d
     WHERE d.delivered_at IS NULL AND d.given_up_at IS NULL
$$;

-- Run hourly by pgqr-housekeeping: drop history older than the `retention` setting, except a resolved alert
-- whose "resolved" is still pending delivery (its deliveries go with it through ON DELETE CASCADE, so pruning
-- it would lose the page). pg_cron's own cron.job_run_details is pruned by the pgqr-cron-history job instead
-- (it lives in pg_cron's database).
CREATE FUNCTION pgqr.housekeeping()
RETURNS TABLE (what text, deleted bigint)
LANGUAGE plpgsql AS $$
DECLARE
    cutoff timestamptz := now() - pgqr.setting('retention')::interval;
    n bigint;
BEGIN
    DELETE FROM pgqr.refresh_log WHERE at < cutoff;
    GET DIAGNOSTICS n = ROW_COUNT;
    what := 'refresh_log'; deleted := n; RETURN NEXT;

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
END
$$;

-- The cron expression for a tick every `every`: N seconds (1-59, pg_cron 1.5+), minutes dividing an hour,
-- hours dividing a day, or one day. Other periods would drift at the hour or day boundary (*/7 runs at :56
-- and again at :00), so they are refused.
CREATE FUNCTION pgqr.cron_schedule_for(every interval) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    secs numeric := extract(epoch FROM every);
    mins integer;
BEGIN
    IF secs >= 1 AND secs < 60 AND secs = trunc(secs) THEN
        RETURN format('%s seconds', secs);
    ELSIF secs >= 60 AND secs % 60 = 0 THEN
        mins := (secs / 60)::integer;
        IF mins = 1 THEN
            RETURN '* * * * *';
        ELSIF mins < 60 AND 60 % mins = 0 THEN
            RETURN format('*/%s * * * *', mins);
        ELSIF mins = 60 THEN
            RETURN '0 * * * *';
        ELSIF mins % 60 = 0 AND mins < 1440 AND 1440 % mins = 0 THEN
            RETURN format('0 */%s * * *', mins / 60);
        ELSIF mins = 1440 THEN
            RETURN '0 0 * * *';
        END IF;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
        MESSAGE = format('cannot tick every %s: use 1-59 seconds, minutes that divide an hour '
                         '(1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30), hours that divide a day, or 1 day',
                         pgqr.human_interval(every));
END
$$;

-- Whether a pg_cron extversion ('1.4-1', '1.6') accepts 'N seconds' schedules (1.5 and later).
CREATE FUNCTION pgqr.pg_cron_has_seconds(extversion text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT string_to_array(split_part(extversion, '-', 1), '.')::integer[] >= ARRAY[1, 5]
$$;

-- Push pgqr.jobs to pg_cron when pg_cron lives in this database. Otherwise only pgqr.jobs changed, and
-- `pgqr migrate` (or the CLI command that called us) applies it in pg_cron's database.
CREATE FUNCTION pgqr.sync_cron() RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    j pgqr.jobs;
BEGIN
    IF to_regclass('cron.job') IS NULL THEN
        RAISE NOTICE 'pg_cron lives in another database: run `pgqr migrate` to apply pgqr.jobs there';
        RETURN false;
    END IF;
    FOR j IN SELECT * FROM pgqr.jobs ORDER BY name LOOP
        -- pg_cron 1.4's upsert by name updates only schedule and command; alter_job sets the rest
        PERFORM cron.alter_job(
            cron.schedule_in_database(j.name, j.schedule, j.command, current_database(), NULL, j.active),
            database => current_database(), active => j.active);
    END LOOP;
    RETURN true;
END
$$;

-- `pgqr schedule --every`: change the tick period. pg_cron_version is pg_cron's extversion (the CLI reads it
-- in pg_cron's database); NULL means look here, which works where pg_cron lives in this database.
CREATE FUNCTION pgqr.schedule(every interval, pg_cron_version text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    cron_expr text := pgqr.cron_schedule_for(every);
    version text := coalesce(pg_cron_version,
                             (SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'));
BEGIN
    IF every < interval '1 minute' AND version IS NOT NULL AND NOT pgqr.pg_cron_has_seconds(version) THEN
        RAISE EXCEPTION USING ERRCODE = 'feature_not_supported',
            MESSAGE = format('ticking every %s needs pg_cron 1.5 or later (this server has %s); '
                             'use 1 minute or longer', pgqr.human_interval(every), version);
    END IF;
    UPDATE pgqr.jobs SET schedule = cron_expr WHERE name = 'pgqr-tick';
    INSERT INTO pgqr.settings (key, value, description)
    VALUES ('tick_every', every::text, 'The tick period, kept by pgqr.schedule().')
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;
    PERFORM pgqr.sync_cron();
    RETURN cron_expr;
END
$$;

-- `pgqr pause` / `pgqr resume`: every pgqr job inactive / active. Returns how many jobs changed.
CREATE FUNCTION pgqr.set_jobs_active(want boolean) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    UPDATE pgqr.jobs SET active = want WHERE active IS DISTINCT FROM want;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM pgqr.sync_cron();
    RETURN n;
END
$$;

CREATE FUNCTION pgqr.pause() RETURNS integer
LANGUAGE sql AS $$ SELECT pgqr.set_jobs_active(false) $$;

CREATE FUNCTION pgqr.resume() RETURNS integer
LANGUAGE sql AS $$ SELECT pgqr.set_jobs_active(true) $$;

-- `pgqr status --json`: one document with the health view, listeners, jobs, the last tick and firing
-- alerts. Intervals become seconds for machines.
CREATE FUNCTION pgqr.status() RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'database', current_database(),
        'instances', coalesce((
            SELECT jsonb_agg(to_jsonb(h) - 'qr_age'
                             || jsonb_build_object('qr_age_seconds', round(extract(epoch FROM h.qr_age)))
                             ORDER BY h.instance_name)
            FROM pgqr.instance_health h), '[]'::jsonb),
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

INSERT INTO pgqr.jobs (name, schedule, command, target, description) VALUES
    ('pgqr-alerts', '*/5 * * * *', 'SELECT pgqr.check_alerts()', 'app',
     'Evaluates the alert rules; transitions go to pgqr.alerts and pgqr.alert_deliveries, '
     'then NOTIFY pgqr_alert wakes the listeners that deliver them.'),
    ('pgqr-housekeeping', '17 * * * *', 'SELECT pgqr.housekeeping()', 'app',
     'Deletes refresh log, ticks, resolved alerts and gone listeners older than the retention setting.'),
    -- pg_cron never prunes cron.job_run_details, and a per-minute tick adds 1440 rows a day. This job runs in
    -- pg_cron's database, where pgqr.settings does not exist (unless pg_cron lives here), so its retention is
    -- a literal matching the retention setting's default; edit the command here and run `pgqr migrate` to
    -- change it. It deletes only pgqr's jobs' rows (every database's pgqr-*, all with this same retention).
    ('pgqr-cron-history', '23 * * * *',
     $cmd$DELETE FROM cron.job_run_details WHERE start_time < now() - interval '7 days' AND jobid IN (SELECT jobid FROM cron.job WHERE jobname LIKE 'pgqr-%')$cmd$,
     'cron',
     'Deletes pgqr''s own pg_cron run history older than 7 days.')
ON CONFLICT (name) DO NOTHING;
