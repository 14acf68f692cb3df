-- pgqr 0001: settings and error classes. Everything pgqr owns lives in schema pgqr (created by the migration
-- runner with its migrations table). Each setting is seeded here, once, with its type and lower bound; a value
-- that does not fit is refused when it is written, with a message that says what would fit.

CREATE TYPE pgqr.setting_type AS ENUM ('integer', 'seconds', 'number', 'interval', 'text');

CREATE TABLE pgqr.settings (
    key         text PRIMARY KEY,
    value       text NOT NULL,
    type        pgqr.setting_type NOT NULL,
    min_value   numeric,                  -- for interval: seconds
    description text NOT NULL
);

-- The typed value of a setting, or NULL when it does not parse or is below its minimum.
CREATE FUNCTION pgqr.setting_error(t pgqr.setting_type, v text, lo numeric) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    n numeric;
BEGIN
    n := CASE t WHEN 'integer' THEN v::integer::numeric
                WHEN 'seconds' THEN v::float8::numeric
                WHEN 'number' THEN v::float8::numeric
                WHEN 'interval' THEN extract(epoch FROM v::interval)
                ELSE NULL END;
    IF n IS NOT NULL AND lo IS NOT NULL AND n < lo THEN
        RETURN format('must be at least %s', CASE WHEN t = 'interval' THEN (lo || ' seconds') ELSE lo::text END);
    END IF;
    RETURN NULL;
EXCEPTION WHEN data_exception THEN
    RETURN format('must be %s', CASE t WHEN 'integer' THEN 'a whole number' WHEN 'interval' THEN 'an interval like ''5 minutes'''
                                       ELSE 'a number' END);
END
$$;

CREATE FUNCTION pgqr.check_setting() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    problem text := pgqr.setting_error(NEW.type, NEW.value, NEW.min_value);
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('pgqr setting %s %s, not %L', NEW.key, problem, NEW.value);
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER settings_valid BEFORE INSERT OR UPDATE ON pgqr.settings
    FOR EACH ROW EXECUTE FUNCTION pgqr.check_setting();

CREATE FUNCTION pgqr.setting(setting_key text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT value FROM pgqr.settings WHERE key = setting_key
$$;

CREATE FUNCTION pgqr.seconds(setting_key text) RETURNS interval
LANGUAGE sql STABLE AS $$
    SELECT make_interval(secs => value::float8) FROM pgqr.settings WHERE key = setting_key
$$;

INSERT INTO pgqr.settings (key, value, type, min_value, description) VALUES
    -- the refresh engine (sql/0004_refresh.sql)
    ('qr_lifetime_seconds', '45', 'seconds', 5,
     'How long Evolution keeps one QR (its qrTimeout); the next poll is due just after the estimated expiry.'),
    ('rotation_margin_seconds', '0.5', 'seconds', 0,
     'Poll this long after the earliest moment the current QR can have expired.'),
    ('retry_min_seconds', '1', 'seconds', 0.2,
     'Shortest wait before polling again when a poll still returned the same QR.'),
    ('retry_max_seconds', '5', 'seconds', 1,
     'Longest wait between such retries while Evolution keeps the QR.'),
    ('webhook_safety_seconds', '60', 'seconds', 5,
     'An instance whose last QR came by webhook is polled only this often (webhooks bring the next one).'),
    ('no_qr_retry_seconds', '3', 'seconds', 0.5,
     'First retry after a reply without a QR yet ({"count":0}); doubles per empty reply up to 30 s.'),
    ('close_poll_seconds', '20', 'seconds', 1,
     'Cadence while Evolution reports the instance closed (each connect opens a WhatsApp socket); doubles.'),
    ('close_poll_max_seconds', '300', 'seconds', 1,
     'Cap on that cadence.'),
    ('slow_connect_ms', '1500', 'number', 0,
     'A connect slower than this went through Evolution''s close branch (it sleeps 2 s): not a cached QR.'),
    ('max_calls_per_minute', '12', 'integer', 1,
     'Never more Evolution calls than this for one instance in any 60 s.'),
    ('lease_seconds', '30', 'seconds', 5,
     'How long a claimed instance stays leased to one listener; the listener extends it to cover its HTTP timeout.'),
    -- monitoring and alerts (sql/0005, 0006)
    ('alert_stale_after', '5 minutes', 'interval', 1,
     'Alert stale_qr: a connecting instance whose QR is older than this (or never came) is stale.'),
    ('alert_listener_after', '2 minutes', 'interval', 1,
     'Alert no_listener and pgqr.listeners.live: a heartbeat older than this is not live.'),
    ('alert_tick_after', '3 minutes', 'interval', 1,
     'Alert ticks_not_firing: no tick for this long (at least three tick periods).'),
    ('alert_failure_rate', '0.5', 'number', 0,
     'Alert evolution_failures: fires when more than this fraction of Evolution calls failed in the window.'),
    ('alert_failure_window', '15 minutes', 'interval', 1,
     'Alert evolution_failures: how far back to count Evolution calls.'),
    ('alert_failure_min_calls', '5', 'integer', 1,
     'Alert evolution_failures: fewer calls than this in the window never fire (1 failure of 1 is noise).'),
    ('alert_delivery_lease', '2 minutes', 'interval', 1,
     'How long a listener holds a claimed alert delivery (all its in-process retries); then another may take it.'),
    ('alert_delivery_retry_after', '30 seconds', 'interval', 1,
     'After a failed delivery round, wait this long before the next; doubles per round, capped at 30 minutes.'),
    ('alert_delivery_max_attempts', '12', 'integer', 1,
     'Delivery rounds before an alert is given up (a WARNING, given_up_at set); about 3 hours with the defaults.'),
    -- control (sql/0008)
    ('tick_every', '1 minute', 'interval', 1,
     'The tick period, kept by pgqr.schedule(); the ticks alert never fires before three periods pass.'),
    ('retention', '7 days', 'interval', 3600,
     'pgqr.housekeeping() deletes refresh_log, ticks, resolved alerts and gone listeners older than this.');

-- What each failure class means and how long it waits before the next try. Its rows come from the one table
-- in pgqr/evolution.py (ERROR_CLASSES), copied here by every `pgqr migrate`. A transient class backs off
-- exponentially from backoff_base, doubling per consecutive failure up to backoff_max, with jitter; a
-- permanent one waits backoff_base every time (a human has to fix something first).
CREATE TABLE pgqr.error_classes (
    error_class  text PRIMARY KEY,
    transient    boolean NOT NULL,
    backoff_base interval NOT NULL,
    backoff_max  interval NOT NULL,
    meaning      text NOT NULL
);

-- Delay before the next attempt after `failures` consecutive failures of `cls` (an unknown class waits like
-- an internal error).
CREATE FUNCTION pgqr.backoff(cls text, failures integer) RETURNS interval
LANGUAGE sql VOLATILE AS $$
    SELECT CASE WHEN c.transient
                -- exponential, capped, with jitter in [50%, 100%] so instances and replicas spread out
                THEN least(c.backoff_base * 2 ^ least(greatest(failures - 1, 0), 30), c.backoff_max)
                     * (0.5 + random() / 2)
                ELSE c.backoff_base END
    FROM pgqr.error_classes c
    WHERE c.error_class = cls
    UNION ALL
    SELECT interval '30 seconds' * (0.5 + random() / 2)   -- a class the table does not know yet
    WHERE NOT EXISTS (SELECT 1 FROM pgqr.error_classes WHERE error_class = cls)
$$;
