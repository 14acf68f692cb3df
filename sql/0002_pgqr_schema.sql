-- pgqr 0002: everything pgqr owns lives in schema pgqr (created by the migration runner with its
-- migrations table). Nothing here holds a token, key or secret.

CREATE TABLE pgqr.settings (
    key         text PRIMARY KEY,
    value       text NOT NULL,
    description text NOT NULL
);

INSERT INTO pgqr.settings (key, value, description) VALUES
    ('lease_seconds', '60',
     'How long a claimed instance stays leased to one listener; longer than the slowest Evolution call.'),
    ('backoff_base_seconds', '30',
     'First delay after a transient failure (5xx, timeout, reset); doubles per consecutive failure, with jitter.'),
    ('backoff_max_seconds', '900',
     'Cap on the transient backoff.'),
    ('permanent_backoff_seconds', '1800',
     'Delay after a failure that retrying soon will not fix (404, 401, error body, empty reply).'),
    ('claim_batch', '500',
     'Most instances one reconcile claims at once.'),
    ('min_refresh_seconds', '20',
     'An instance refreshed this recently is skipped by the next wake-up (QR codes rotate every ~45 s).')
ON CONFLICT (key) DO NOTHING;

-- Refresh bookkeeping, one row per instance (created by trigger; claim also fills gaps).
CREATE TABLE pgqr.instance_state (
    instance_name        text PRIMARY KEY
                         REFERENCES public.evolution_instances (instance_name)
                         ON UPDATE CASCADE ON DELETE CASCADE,
    last_attempt_at      timestamptz,
    last_success_at      timestamptz,
    last_outcome         text,
    last_error_class     text,
    last_http_status     integer,
    consecutive_failures integer NOT NULL DEFAULT 0,
    next_attempt_at      timestamptz,
    lease_owner          text,
    lease_expires_at     timestamptz,
    qr_count             integer,
    -- since when the instance has been waiting for a QR: when pgqr first saw it, and again whenever it turns
    -- connecting. The stale_qr alert measures from this or the last QR, whichever is later (an adopted table
    -- may have no created_at, and an instance switched back to connecting keeps its old last_qr_update).
    connecting_since     timestamptz NOT NULL DEFAULT now()
);

-- Append-only: one row per refresh attempt or webhook event.
CREATE TABLE pgqr.refresh_log (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    instance_name text NOT NULL,          -- no foreign key: the log outlives deleted instances
    source       text NOT NULL CHECK (source IN ('poll', 'webhook')),
    outcome      text NOT NULL CHECK (outcome IN ('qr', 'no_qr', 'connected', 'failed', 'event')),
    applied      boolean NOT NULL,        -- false when a guard dropped a late write
    qr_updated   boolean NOT NULL,
    http_status  integer,
    latency_ms   real,
    error_class  text,
    owner        text
);
CREATE INDEX refresh_log_at_idx ON pgqr.refresh_log (at);

CREATE TABLE pgqr.ticks (
    id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX ticks_at_idx ON pgqr.ticks (at);

CREATE TABLE pgqr.listener_heartbeats (
    owner        text PRIMARY KEY,        -- host:pid:random, also the lease owner
    host         text NOT NULL,
    pid          integer NOT NULL,
    version      text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    stopped_at   timestamptz
);

-- The pg_cron jobs pgqr wants. `pgqr migrate` schedules each in pg_cron's database
-- (cron.database_name) to run in this one (target 'app') or in pg_cron's own (target 'cron', for work on
-- cron.* tables that another database cannot see); `pgqr schedule/pause/resume` change them here first.
CREATE TABLE pgqr.jobs (
    name        text PRIMARY KEY,
    schedule    text NOT NULL,
    command     text NOT NULL,
    active      boolean NOT NULL DEFAULT true,
    target      text NOT NULL DEFAULT 'app' CHECK (target IN ('app', 'cron')),
    description text NOT NULL
);

INSERT INTO pgqr.jobs (name, schedule, command, description) VALUES
    ('pgqr-tick', '* * * * *', 'SELECT pgqr.tick()',
     'Wakes the listeners: records a tick and sends NOTIFY pgqr_refresh.')
ON CONFLICT (name) DO NOTHING;
