-- pgqr 0002: pgqr's own bookkeeping. Nothing here holds a token, key or secret. Instances are keyed by the
-- text form of the app table's primary key (see the binding, 0003), so names need not be unique.

CREATE TYPE pgqr.source AS ENUM ('poll', 'webhook');
-- qr: a QR image (new or the same as before); no_qr: a reply without one yet; connected: Evolution says open;
-- closed: Evolution says close (no QR to expect until a connect restarts it); gave_up: Evolution stopped
-- (QR limit reached, logged out, deleted); failed: an error reply (see pgqr.error_classes); event: a webhook
-- that changes nothing but what pgqr knows of Evolution's state.
CREATE TYPE pgqr.outcome AS ENUM ('qr', 'no_qr', 'connected', 'closed', 'gave_up', 'failed', 'event');

CREATE TABLE pgqr.instance_state (
    key                  text PRIMARY KEY,     -- the app row's primary key, as text
    name                 text NOT NULL,        -- the app row's instance name (a copy, for views and logs)
    waiting              boolean NOT NULL,     -- the app's status is one of the binding's waiting values
    -- since when it has been waiting: set whenever it turns waiting (the stale_qr alert measures from it)
    connecting_since     timestamptz NOT NULL DEFAULT now(),
    due_at               timestamptz,          -- next poll; NULL while not waiting
    lease_owner          text,
    lease_expires_at     timestamptz,
    last_poll_at         timestamptz,          -- when the last poll started (the lower bound of a new QR's birth)
    last_attempt_at      timestamptz,
    last_success_at      timestamptz,
    last_outcome         pgqr.outcome,
    last_error_class     text,
    last_http_status     integer,
    last_latency_ms      real,
    consecutive_failures integer NOT NULL DEFAULT 0,
    repeats              integer NOT NULL DEFAULT 0,   -- polls in a row with the same outcome (same QR, no QR, closed)
    recent_polls         timestamptz[] NOT NULL DEFAULT '{}',  -- start times of the last polls (the rate cap)
    evolution_state      text,                 -- open | connecting | close, as last reported
    evolution_state_at   timestamptz,
    -- the current QR: its md5, when it was first seen, the latest moment it cannot have been made before, and
    -- so the earliest moment it can expire (what pages count down to). qr and pairing_code are kept here
    -- only when the binding has no column for them.
    qr_md5               text,
    qr_seen_at           timestamptz,
    qr_born_after        timestamptz,
    qr_expires_at        timestamptz,
    qr_source            pgqr.source,
    qr_count             integer,
    qr                   text,
    pairing_code         text
);
CREATE INDEX instance_state_due_idx ON pgqr.instance_state (due_at) WHERE waiting;
-- hash, not btree: a btree entry cannot pass about 2.7 kB, and the app decides how long a name is
CREATE INDEX instance_state_name_idx ON pgqr.instance_state USING hash (name);

-- Append-only: one row per poll and per webhook that changed something. A webhook that only repeats what
-- pgqr already knows (a connection.update storm) writes nothing here.
CREATE TABLE pgqr.refresh_log (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    instance_key  text NOT NULL,          -- no foreign key: the log outlives deleted instances
    instance_name text NOT NULL,
    source        pgqr.source NOT NULL,
    outcome       pgqr.outcome NOT NULL,
    applied       boolean NOT NULL,       -- false when a guard dropped a late write
    qr_updated    boolean NOT NULL,       -- a new QR was stored
    http_status   integer,
    latency_ms    real,
    error_class   text,
    owner         text
);
CREATE INDEX refresh_log_at_idx ON pgqr.refresh_log (at);
CREATE INDEX refresh_log_key_idx ON pgqr.refresh_log (instance_key, id);

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
    stopped_at   timestamptz,
    listen_ok    boolean                  -- false: LISTEN does not deliver (a transaction pooler); polling only
);

-- Errors inside pgqr's trigger on the app's table: the app's statement goes on (a WARNING), and the error is
-- counted here for `pgqr doctor` and the views.
CREATE TABLE pgqr.trigger_errors (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    message text NOT NULL
);

-- The pg_cron jobs pgqr wants. `pgqr migrate` schedules each in pg_cron's database (cron.database_name) to run
-- in this one (target 'app') or in pg_cron's own (target 'cron', for work on cron.* tables that another
-- database cannot see); `pgqr schedule/pause/resume` change them here first. Seeded in 0008.
CREATE TABLE pgqr.jobs (
    name        text PRIMARY KEY,
    schedule    text NOT NULL,
    command     text NOT NULL,
    active      boolean NOT NULL DEFAULT true,
    target      text NOT NULL DEFAULT 'app' CHECK (target IN ('app', 'cron')),
    description text NOT NULL
);
