-- pgqr 0003: the refresh flow in SQL: tick, the new-instance trigger, claim, and the one write path.
--
-- The rows are the truth; NOTIFY pgqr_refresh is only a wake-up. Listeners claim due rows under a lease,
-- commit, call Evolution API, then hand every result (poll or webhook) to pgqr.record_results().

CREATE FUNCTION pgqr.setting(setting_key text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT value FROM pgqr.settings WHERE key = setting_key
$$;

-- Run by the pg_cron job pgqr-tick every minute.
CREATE FUNCTION pgqr.tick() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    t pgqr.ticks;
BEGIN
    INSERT INTO pgqr.ticks DEFAULT VALUES RETURNING * INTO t;
    PERFORM pg_notify('pgqr_refresh', json_build_object('tick', t.id, 'at', t.at)::text);
    RETURN t.id;
END
$$;

-- An instance that becomes 'connecting' needs its first QR now, not at the next minute: wake the
-- listeners, forget any backoff left from an earlier attempt (the user asked again), and start its wait.
CREATE FUNCTION pgqr.on_instance_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pgqr.instance_state (instance_name) VALUES (NEW.instance_name)
    ON CONFLICT (instance_name) DO NOTHING;
    IF NEW.instance_status = 'connecting'
       AND (TG_OP = 'INSERT' OR OLD.instance_status IS DISTINCT FROM 'connecting') THEN
        UPDATE pgqr.instance_state
           SET consecutive_failures = 0, next_attempt_at = NULL, last_attempt_at = NULL, connecting_since = now()
         WHERE instance_name = NEW.instance_name;
        PERFORM pg_notify('pgqr_refresh', json_build_object(
            'instance_id', NEW.id, 'instance_name', NEW.instance_name, 'reason', 'connecting')::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER pgqr_instance_change
    AFTER INSERT OR UPDATE OF instance_status, instance_name ON public.evolution_instances
    FOR EACH ROW EXECUTE FUNCTION pgqr.on_instance_change();

INSERT INTO pgqr.instance_state (instance_name)
SELECT instance_name FROM public.evolution_instances
ON CONFLICT (instance_name) DO NOTHING;

-- Claim up to max_rows due instances for `claim_owner`: connecting, not in backoff, lease free or expired,
-- and not attempted since `attempted_before` (one reconcile passes its start, so it never loops over rows it
-- has just refreshed; see pgqr.refresh_horizon()). Locks the bookkeeping rows (SKIP LOCKED), so a concurrent
-- claimer re-checks the lease on the row we just stamped and skips it. Run it in its own short transaction
-- and commit before any HTTP call. qr_md5 lets the caller skip sending an unchanged QR image back.
CREATE FUNCTION pgqr.claim(claim_owner text, max_rows integer, attempted_before timestamptz)
RETURNS TABLE (instance_id text, instance_name text, user_id text, instance_token text,
               evolution_url text, qr_md5 text, claimed_at timestamptz)
LANGUAGE sql AS $$
    INSERT INTO pgqr.instance_state (instance_name)
    SELECT i.instance_name FROM public.evolution_instances i
    WHERE i.instance_status = 'connecting'
      AND NOT EXISTS (SELECT 1 FROM pgqr.instance_state s WHERE s.instance_name = i.instance_name)
    ON CONFLICT (instance_name) DO NOTHING;

    WITH due AS (
        SELECT s.instance_name
        FROM pgqr.instance_state s
        JOIN public.evolution_instances i ON i.instance_name = s.instance_name
        WHERE i.instance_status = 'connecting'
          AND (s.next_attempt_at IS NULL OR s.next_attempt_at <= now())
          AND (s.lease_expires_at IS NULL OR s.lease_expires_at <= now())
          AND (s.last_attempt_at IS NULL OR s.last_attempt_at < attempted_before)
        ORDER BY s.last_attempt_at NULLS FIRST, s.instance_name
        LIMIT max_rows
        FOR UPDATE OF s SKIP LOCKED
    ), leased AS (
        UPDATE pgqr.instance_state s
           SET lease_owner = claim_owner,
               lease_expires_at = now() + make_interval(secs => pgqr.setting('lease_seconds')::float8),
               last_attempt_at = now()
          FROM due
         WHERE s.instance_name = due.instance_name
        RETURNING s.instance_name
    )
    SELECT i.id::text, i.instance_name, i.user_id::text, i.instance_token, i.evolution_url,
           md5(i.qr_code), now()
    FROM leased JOIN public.evolution_instances i ON i.instance_name = leased.instance_name
$$;

-- Where one reconcile starts: instances attempted after this are left alone. The short floor keeps a burst
-- of wake-ups (new instances, webhooks) from re-polling everything every few seconds.
CREATE FUNCTION pgqr.refresh_horizon() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT now() - make_interval(secs => pgqr.setting('min_refresh_seconds')::float8)
$$;

-- Delay before the next attempt after `failures` consecutive failures.
CREATE FUNCTION pgqr.backoff(failures integer, transient boolean) RETURNS interval
LANGUAGE sql VOLATILE AS $$
    SELECT make_interval(secs => CASE
        WHEN transient THEN
            -- exponential, capped, with jitter in [50%, 100%] so replicas and instances spread out
            -- (the exponent is capped so that years of failures cannot overflow the power)
            least(pgqr.setting('backoff_base_seconds')::float8 * 2 ^ least(greatest(failures - 1, 0), 30),
                  pgqr.setting('backoff_max_seconds')::float8) * (0.5 + random() / 2)
        ELSE pgqr.setting('permanent_backoff_seconds')::float8
    END)
$$;

-- The one write path. `results` is a JSON array; each element:
--   {instance_name, source: poll|webhook, outcome: qr|no_qr|connected|failed|event,
--    qr (data URL, omitted when unchanged), pairing_code, qr_count, http_status, latency_ms,
--    error_class, transient, claimed_at}
-- Poll results apply only while `writer` still holds the instance's lease; QR writes apply only while the
-- instance is still connecting and nobody stored a QR after claimed_at, so a late writer never overwrites
-- newer truth. Every element appends one refresh_log row. A visible change sends NOTIFY pgqr_qr_updated
-- (ids, name and status only: payloads are capped at 8000 bytes and must never carry a secret).
CREATE FUNCTION pgqr.record_results(writer text, results jsonb)
RETURNS TABLE (instance_name text, applied boolean, qr_updated boolean, status text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r record;
    leased boolean;
    changed boolean;
    v_id text;
    v_user_id text;
    v_status text;
BEGIN
    FOR r IN
        SELECT * FROM jsonb_to_recordset(results) AS x(
            instance_name text, source text, outcome text, qr text, pairing_code text, qr_count integer,
            http_status integer, latency_ms real, error_class text, transient boolean, claimed_at timestamptz)
        ORDER BY x.instance_name
    LOOP
        changed := false;
        v_status := NULL;
        -- One instance whose row the app keeps locked (or a deadlock with an app transaction) costs that
        -- instance this write, never the whole batch: its lease runs out and it is refreshed again. The
        -- listener's connection sets lock_timeout, so a long app transaction cannot stall every instance.
        BEGIN
            -- Lock order, the same everywhere: the app's row, then its bookkeeping row (pgqr_instance_change
            -- fires inside the app's UPDATE and so takes them in that order too), and instances by name. A poll
            -- write-back, a webhook and the app's own writes then queue up instead of deadlocking.
            PERFORM 1 FROM public.evolution_instances e WHERE e.instance_name = r.instance_name FOR UPDATE;
            IF r.source = 'poll' THEN
                -- An expired lease that nobody has claimed again still counts: the result is then still the
                -- newest truth. Once another listener claims the row, the owner changes and this write is dropped.
                PERFORM 1 FROM pgqr.instance_state s
                 WHERE s.instance_name = r.instance_name AND s.lease_owner = writer
                   FOR UPDATE;
                leased := FOUND;
            ELSE
                -- webhooks hold no lease; the state guards below still apply
                PERFORM 1 FROM pgqr.instance_state s WHERE s.instance_name = r.instance_name FOR UPDATE;
                leased := FOUND;
            END IF;

            IF leased AND r.outcome = 'qr' THEN
                UPDATE public.evolution_instances e
                   SET qr_code = coalesce(r.qr, e.qr_code),
                       pairing_code = r.pairing_code,
                       last_qr_update = now()
                 WHERE e.instance_name = r.instance_name
                   AND e.instance_status = 'connecting'
                   AND (r.claimed_at IS NULL OR e.last_qr_update IS NULL OR e.last_qr_update <= r.claimed_at)
                RETURNING e.id::text, e.user_id::text, e.instance_status INTO v_id, v_user_id, v_status;
                changed := FOUND AND r.qr IS NOT NULL;
            ELSIF leased AND r.outcome = 'connected' THEN
                UPDATE public.evolution_instances e
                   SET instance_status = 'connected', qr_code = NULL, pairing_code = NULL
                 WHERE e.instance_name = r.instance_name AND e.instance_status = 'connecting'
                RETURNING e.id::text, e.user_id::text, e.instance_status INTO v_id, v_user_id, v_status;
                changed := FOUND;
            END IF;

            IF leased THEN
                UPDATE pgqr.instance_state s SET
                    last_outcome = r.outcome,
                    last_error_class = r.error_class,
                    last_http_status = coalesce(r.http_status, s.last_http_status),
                    qr_count = coalesce(r.qr_count, s.qr_count),
                    last_success_at = CASE WHEN r.outcome IN ('qr', 'no_qr', 'connected') THEN now()
                                           ELSE s.last_success_at END,
                    consecutive_failures = CASE WHEN r.outcome = 'failed' THEN s.consecutive_failures + 1
                                                WHEN r.outcome = 'event' THEN s.consecutive_failures
                                                ELSE 0 END,
                    next_attempt_at = CASE WHEN r.outcome = 'failed'
                                           THEN now() + pgqr.backoff(s.consecutive_failures + 1, coalesce(r.transient, true))
                                           WHEN r.outcome = 'event' THEN s.next_attempt_at
                                           ELSE NULL END,
                    lease_owner = CASE WHEN r.source = 'poll' THEN NULL ELSE s.lease_owner END,
                    lease_expires_at = CASE WHEN r.source = 'poll' THEN NULL ELSE s.lease_expires_at END
                 WHERE s.instance_name = r.instance_name;
            END IF;
        EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
            leased := false;
            changed := false;
            v_status := NULL;
        END;

        INSERT INTO pgqr.refresh_log (instance_name, source, outcome, applied, qr_updated, http_status,
                                      latency_ms, error_class, owner)
        VALUES (r.instance_name, r.source, r.outcome, leased, changed, r.http_status,
                r.latency_ms, r.error_class, writer);

        IF changed THEN
            PERFORM pg_notify('pgqr_qr_updated', json_build_object(
                'instance_id', v_id, 'instance_name', r.instance_name,
                'user_id', v_user_id, 'status', v_status)::text);
        END IF;

        instance_name := r.instance_name;
        applied := leased;
        qr_updated := changed;
        status := v_status;
        RETURN NEXT;
    END LOOP;
END
$$;

-- On shutdown: give back what this listener still holds, so another replica can take it at once.
CREATE FUNCTION pgqr.release_leases(lease_holder text) RETURNS integer
LANGUAGE sql AS $$
    WITH released AS (
        UPDATE pgqr.instance_state
           SET lease_owner = NULL, lease_expires_at = NULL
         WHERE lease_owner = lease_holder
        RETURNING 1
    )
    SELECT count(*)::integer FROM released
$$;

CREATE FUNCTION pgqr.heartbeat(listener text, listener_host text, listener_pid integer, listener_version text)
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO pgqr.listener_heartbeats (owner, host, pid, version)
    VALUES (listener, listener_host, listener_pid, listener_version)
    ON CONFLICT (owner) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL
$$;

CREATE FUNCTION pgqr.listener_stopped(listener text) RETURNS void
LANGUAGE sql AS $$
    UPDATE pgqr.listener_heartbeats SET stopped_at = now() WHERE owner = listener
$$;
