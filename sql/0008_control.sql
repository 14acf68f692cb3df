-- pgqr 0008: housekeeping and the control functions `pgqr status/schedule/pause/resume` wrap, and pgqr's jobs.

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

    DELETE FROM pgqr.trigger_errors WHERE at < cutoff;
    GET DIAGNOSTICS n = ROW_COUNT;
    what := 'trigger_errors'; deleted := n; RETURN NEXT;
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
    UPDATE pgqr.settings SET value = every::text WHERE key = 'tick_every';
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

INSERT INTO pgqr.jobs (name, schedule, command, target, description) VALUES
    ('pgqr-tick', '* * * * *', 'SELECT pgqr.tick()', 'app',
     'Wakes the listeners and brings pgqr.instance_state in step with the app''s rows: records a tick and sends NOTIFY pgqr_refresh.'),
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
