-- pgqr 0005: psql-first monitoring. Views over pgqr's bookkeeping, a read-only role for dashboards,
-- and pgqr.status() (what `pgqr status --json` prints).
--
-- No view exposes a token, a QR, a pairing code or a URL: a token or a QR lets whoever reads it take over the
-- WhatsApp session, and a URL may carry credentials. Views read settings with a subquery instead of
-- pgqr.setting(): a function runs with the caller's privileges, and pgqr_monitor may read nothing but these views.

-- One row per instance of the bound table: where its QR refresh stands. qr_expires_at is the engine's estimate
-- of the earliest moment the current QR stops working (what a page counts down to); qr_valid says it has not
-- passed yet.
CREATE VIEW pgqr.instance_health AS
SELECT a.key                                  AS instance_key,
       a.name                                 AS instance_name,
       a.status,
       coalesce(a.waiting, false)             AS waiting,
       (a.qr IS NOT NULL OR s.qr IS NOT NULL OR s.qr_md5 IS NOT NULL) AS has_qr,
       s.qr_seen_at                           AS last_qr_update,
       now() - s.qr_seen_at                   AS qr_age,
       s.qr_expires_at,
       coalesce(a.waiting AND s.qr_expires_at > now(), false) AS qr_valid,
       s.qr_source,
       s.evolution_state,
       s.last_attempt_at,
       s.last_success_at,
       s.last_outcome,
       s.last_error_class,
       s.last_http_status,
       coalesce(s.consecutive_failures, 0)    AS consecutive_failures,
       s.due_at                               AS next_attempt_at,
       s.lease_owner,
       s.lease_expires_at,
       s.connecting_since
FROM pgqr.app_instances a
LEFT JOIN pgqr.instance_state s ON s.key = a.key;

-- How fresh the waiting instances' QRs are right now (the engine's figure; /metrics shows the same).
CREATE VIEW pgqr.freshness AS
SELECT count(*) FILTER (WHERE s.waiting)                                   AS waiting,
       count(*) FILTER (WHERE s.waiting AND s.qr_expires_at > now())       AS qr_valid,
       coalesce(extract(epoch FROM max(now() - s.qr_expires_at)
                FILTER (WHERE s.waiting AND s.qr_expires_at <= now())), 0)::float8 AS oldest_expired_seconds
FROM pgqr.instance_state s;

-- pgqr's pg_cron jobs and their runs of the last 24 hours, one definition for both places pg_cron can live. Where
-- it lives in this database (the runner creates its extension before migrating, so cron.job is visible here
-- exactly then), from cron.job and cron.job_run_details; where it lives in another database (cron.* is
-- invisible from here), from pgqr.jobs, with pgqr.ticks standing in for the tick job's runs. It runs as pgqr's
-- owner, which pg_cron's row security (username = current_user) allows for pgqr's own jobs, so pgqr_monitor
-- needs no grant on cron.*. Jobs named `pgqr-x@otherdb` belong to other application databases.
CREATE FUNCTION pgqr.cron_job_runs()
RETURNS TABLE (jobname text, schedule text, active boolean, runid bigint, status text, start_time timestamptz,
               end_time timestamptz, duration interval, message text, source text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgqr AS $$
BEGIN
    IF to_regclass('cron.job') IS NOT NULL THEN
        RETURN QUERY EXECUTE $q$
            SELECT j.jobname::text, j.schedule, j.active, d.runid, d.status, d.start_time, d.end_time,
                   d.end_time - d.start_time, d.return_message, 'cron.job_run_details'::text
            FROM cron.job j
            LEFT JOIN LATERAL (
                SELECT r.runid, r.status, r.start_time, r.end_time, r.return_message
                FROM cron.job_run_details r
                WHERE r.jobid = j.jobid AND r.start_time >= now() - interval '24 hours'
            ) d ON true
            WHERE j.jobname LIKE 'pgqr-%' AND j.jobname NOT LIKE '%@%'
            ORDER BY 1, 6 DESC NULLS LAST
        $q$;
    ELSE
        RETURN QUERY
        SELECT j.name, j.schedule, j.active, t.id,
               CASE WHEN t.id IS NOT NULL THEN 'succeeded' END,
               t.at, NULL::timestamptz, NULL::interval,
               CASE WHEN t.id IS NOT NULL THEN 'tick recorded in pgqr.ticks'
                    -- not current_setting('cron.database_name'): reading it needs pg_read_all_settings
                    ELSE 'run details are in cron.job_run_details in pg_cron''s database (cron.database_name)'
               END,
               'pgqr.ticks'::text
        FROM pgqr.jobs j
        LEFT JOIN LATERAL (
            SELECT k.id, k.at FROM pgqr.ticks k
            WHERE j.name = 'pgqr-tick' AND k.at >= now() - interval '24 hours'
        ) t ON true
        ORDER BY 1, 6 DESC NULLS LAST;
    END IF;
END
$$;

CREATE VIEW pgqr.cron_runs AS SELECT * FROM pgqr.cron_job_runs();

-- Per hour over the last 24 hours (every hour listed, quiet ones as zeros), counting every refresh in the
-- log, not each instance's latest. calls: Evolution calls made by listeners (source poll); webhook_events:
-- what Evolution pushed; successes and failures count both sources.
CREATE VIEW pgqr.refresh_stats AS
WITH hours AS (
    SELECT generate_series(date_trunc('hour', now()) - interval '23 hours', date_trunc('hour', now()),
                           interval '1 hour') AS hour
), log AS (
    SELECT date_trunc('hour', l.at) AS hour, l.*
    FROM pgqr.refresh_log l
    WHERE l.at >= date_trunc('hour', now()) - interval '23 hours'
), by_class AS (
    SELECT c.hour, jsonb_object_agg(c.error_class, c.n) AS failures_by_class
    FROM (SELECT hour, coalesce(error_class, 'unknown') AS error_class, count(*) AS n
          FROM log WHERE outcome = 'failed' GROUP BY 1, 2) c
    GROUP BY c.hour
)
SELECT h.hour,
       count(l.id) FILTER (WHERE l.source = 'poll')                          AS calls,
       count(l.id) FILTER (WHERE l.source = 'webhook')                       AS webhook_events,
       count(l.id) FILTER (WHERE l.outcome IN ('qr', 'no_qr', 'connected'))  AS successes,
       count(l.id) FILTER (WHERE l.outcome = 'failed')                       AS failures,
       coalesce(b.failures_by_class, '{}'::jsonb)                            AS failures_by_class,
       count(l.id) FILTER (WHERE l.qr_updated)                               AS qr_updates,
       count(DISTINCT l.instance_key)                                       AS instances,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY l.latency_ms)             AS p50_latency_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY l.latency_ms)            AS p95_latency_ms
FROM hours h
LEFT JOIN log l ON l.hour = h.hour
LEFT JOIN by_class b ON b.hour = h.hour
GROUP BY h.hour, b.failures_by_class
ORDER BY h.hour DESC;

-- Listeners that have not stopped cleanly: live ones, and ones that went silent (crashed, network cut).
CREATE VIEW pgqr.listeners AS
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
       (SELECT count(*) FROM pgqr.instance_state s
         WHERE s.lease_owner = l.owner AND s.lease_expires_at > now()) AS leases_held,
       l.listen_ok
FROM pgqr.listener_heartbeats l
WHERE l.stopped_at IS NULL
ORDER BY l.heartbeat_at DESC;

-- A read-only role for dashboards and on-call humans. Roles are cluster-wide: another database on this
-- server may have created it already (even concurrently, hence the exception handler). NOLOGIN: grant it to
-- a login role (GRANT pgqr_monitor TO grafana).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgqr_monitor') THEN
        CREATE ROLE pgqr_monitor NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

GRANT USAGE ON SCHEMA pgqr TO pgqr_monitor;
GRANT SELECT ON pgqr.instance_health, pgqr.freshness, pgqr.cron_runs, pgqr.refresh_stats, pgqr.listeners
    TO pgqr_monitor;
