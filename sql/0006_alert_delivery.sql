-- pgqr 0006: alert delivery from the database, exactly once across replicas.
--
-- The rows are the truth; NOTIFY pgqr_alert is only a wake-up. check_alerts() now writes every transition
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

-- Existing rows are history: nothing is queued for them, so on-call is not paged for it. A rule firing now
-- was announced by 0005's NOTIFY; its resolution will be queued by check_alerts() below.

-- As in 0005, plus: each transition is queued in pgqr.alert_deliveries in this same transaction. The NOTIFY
-- keeps its payload for humans LISTENing in psql; pgqr's listeners read the outbox instead.
CREATE OR REPLACE FUNCTION pgqr.check_alerts()
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

-- As in 0005, except that a resolved alert whose "resolved" is still pending delivery is kept (its
-- deliveries go with it through ON DELETE CASCADE, so pruning it would lose the page).
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

UPDATE pgqr.jobs
   SET description = 'Evaluates the alert rules; transitions go to pgqr.alerts and pgqr.alert_deliveries, '
                     'then NOTIFY pgqr_alert wakes the listeners that deliver them.'
 WHERE name = 'pgqr-alerts';
