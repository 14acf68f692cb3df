-- pgqr 0007: the alert delivery outbox.
--
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

