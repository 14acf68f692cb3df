-- pgqr 0009: one clock, one claim, no refused webhook.
--
-- * One clock, the database's. A poll's start is its claim's now(), stored on the row; a webhook's is now() when
--   its write begins. The sidecar hands over durations only (a call's latency), never a timestamp, so a sidecar
--   whose clock is off by any amount plans, guards and caps exactly as one whose clock is right.
-- * A claim is a fence. Every claim takes a number from a sequence (it never repeats, even after a crash) and
--   the poll's write must present it. The app-table trigger and the tick's sync supersede a pending claim when
--   the row's name, Evolution URL, token or waiting status changes; a superseded result writes nothing.
-- * A claim counts toward the per-instance cap when it is made and moves due_at past its lease, so neither a
--   stalled write-back nor a status flip adds calls, and a leased row is never at the head of the due index.
-- * A QR never comes back: the md5s of the images an instance has had are kept, and a replaced one is stale
--   whether a late poll or a retried webhook brings it.
-- * Whatever the app's table refuses (CHECK, trigger, RLS, exclusion) costs that one row: outcome app_refused.

CREATE SEQUENCE pgqr.claim_numbers;

ALTER TABLE pgqr.instance_state
    ADD COLUMN claim_id   bigint,        -- the pending claim's number: only that call's result may write
    ADD COLUMN claimed_at timestamptz,   -- when it was made, by the database's clock: the call's start
    ADD COLUMN qr_history text[] NOT NULL DEFAULT '{}';  -- md5s of the images this instance had before (newest last)

-- "applied" meant two things; the log's column says what it records: the result was written.
ALTER TABLE pgqr.refresh_log RENAME COLUMN applied TO written;
ALTER TABLE pgqr.refresh_log ADD COLUMN detail text;  -- why a result was not written (app_refused: SQLSTATE: message)

-- Used only inside function bodies (run after this migration commits), never in this file's own statements.
ALTER TYPE pgqr.outcome ADD VALUE 'app_refused';

-- A poll result names its claim; it no longer brings a timestamp of its own.
DROP FUNCTION pgqr.record_results(text, jsonb);
DROP FUNCTION pgqr.plan_next(pgqr.instance_state, pgqr.result);
ALTER TYPE pgqr.result DROP ATTRIBUTE started_at, ADD ATTRIBUTE claim_id bigint;
ALTER TYPE pgqr.plan ADD ATTRIBUTE stale boolean;

-- The rate cap, one rule: the start times of the last max_calls_per_minute claims are kept, and no new poll
-- may start until 60 s after the oldest of them.
CREATE FUNCTION pgqr.polls_kept(polls timestamptz[]) RETURNS timestamptz[]
LANGUAGE sql STABLE AS $$
    SELECT polls[greatest(cardinality(polls) - pgqr.setting('max_calls_per_minute')::integer + 1, 1):]
$$;

CREATE FUNCTION pgqr.poll_floor(polls timestamptz[]) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN cardinality(polls) >= pgqr.setting('max_calls_per_minute')::integer
                THEN polls[cardinality(polls) - pgqr.setting('max_calls_per_minute')::integer + 1]
                     + interval '60 seconds' END
$$;

-- The images an instance had: enough to recognise any that Evolution's retries could still bring.
CREATE FUNCTION pgqr.history_with(history text[], md5 text) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN md5 IS NULL OR md5 = ANY(history) THEN history
                ELSE (history || md5)[greatest(cardinality(history) - 14, 1):] END
$$;

-- Lease up to max_rows instances due by `due_by` to `claim_owner` for `lease`, earliest due first, and return
-- what calling Evolution for them takes (the token only ever goes into the apikey header) with the claim's number
-- and time. Rows the app has moved out of waiting without pgqr's trigger (triggers off) are put to rest instead.
-- Run it in its own short transaction and commit before any HTTP call; SKIP LOCKED and the lease keep replicas apart.
DROP FUNCTION pgqr.claim(text, integer, interval, timestamptz);
CREATE FUNCTION pgqr.claim(claim_owner text, max_rows integer, lease interval, due_by timestamptz DEFAULT now())
RETURNS TABLE (key text, name text, token text, url text, phone text, qr_md5 text, claimed_at timestamptz,
               claim_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    keys text[];
BEGIN
    -- a claimed row's due_at is its lease's end, so leased rows are not at the head of the due index; the
    -- lease is still checked, for a caller that claims ahead (due_by in the future) or a due time moved by hand
    keys := ARRAY(
        SELECT s.key FROM pgqr.instance_state s
        WHERE s.waiting AND s.due_at <= due_by AND (s.lease_expires_at IS NULL OR s.lease_expires_at <= now())
        ORDER BY s.due_at
        LIMIT greatest(max_rows, 0)
        FOR UPDATE OF s SKIP LOCKED);
    IF cardinality(keys) = 0 THEN
        RETURN;
    END IF;
    UPDATE pgqr.instance_state s SET waiting = false, due_at = NULL, claim_id = NULL
     WHERE s.key = ANY(keys)
       AND NOT EXISTS (SELECT 1 FROM pgqr.app_rows(keys) a WHERE a.key = s.key AND a.waiting);
    RETURN QUERY
    UPDATE pgqr.instance_state s
       SET claim_id = nextval('pgqr.claim_numbers'), claimed_at = now(),
           lease_owner = claim_owner, lease_expires_at = now() + lease, due_at = now() + lease,
           last_attempt_at = now(), recent_polls = pgqr.polls_kept(s.recent_polls || now())
      FROM pgqr.app_rows(keys) a
     WHERE s.key = a.key AND a.waiting
    RETURNING s.key, a.name, a.token, a.url, a.phone, s.qr_md5, s.claimed_at, s.claim_id;
END
$$;

-- Seconds until the earliest instance falls due (0: one is due now), NULL when none waits: how long a listener
-- may sleep before claiming again. One step down the due index (a leased row's due_at is its lease's end).
CREATE OR REPLACE FUNCTION pgqr.next_due_in() RETURNS float8
LANGUAGE sql STABLE AS $$
    SELECT greatest(extract(epoch FROM s.due_at - now()), 0)::float8
    FROM pgqr.instance_state s WHERE s.waiting AND s.due_at IS NOT NULL
    ORDER BY s.due_at LIMIT 1
$$;

-- The schedule that follows the QR's life (the engine's rules, in one place), at the database's time `at`.
--   A poll started when it was claimed (s.claimed_at) and saw its reply latency_ms later; a webhook sees at `at`.
--   A new image was made between the last poll that did not return it and the reply that did (a webhook
--   brings it as it is made; a connect slow enough to have gone through Evolution's close branch made it
--   during the call). It expires one lifetime after that, so the next poll is due just after the earliest
--   possible expiry. A poll that still returns the same image narrows the estimate (the image was current
--   then) and retries soon, half the remaining window at a time, within [retry_min, retry_max]: after a few
--   rotations the window in which a rotation can hide is a second or two. Only a fast reply proves Evolution
--   answered from memory (state connecting); a slow one that returns the same image went through its close
--   branch, which opens a socket each time: that is polled at the slow, doubling close cadence.
--   A QR brought by webhook moves the next poll out to the slow safety cadence: webhooks bring the next.
--   An image the instance has already had (a late poll, a retried webhook) or one older than what was stored
--   during the poll is stale: it changes nothing, and the next poll is due after the current image's expiry.
--   No poll is due before the rate cap allows it.
CREATE FUNCTION pgqr.plan_next(s pgqr.instance_state, r pgqr.result, at timestamptz) RETURNS pgqr.plan
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    p       pgqr.plan;
    life    interval := pgqr.seconds('qr_lifetime_seconds');
    rmin    interval := pgqr.seconds('retry_min_seconds');
    rmax    interval := pgqr.seconds('retry_max_seconds');
    started timestamptz := CASE WHEN r.source = 'poll' THEN coalesce(s.claimed_at, at) ELSE at END;
    seen    timestamptz := least(started + make_interval(secs => coalesce(r.latency_ms, 0) / 1000.0), at);
    slow    boolean := coalesce(r.latency_ms >= pgqr.setting('slow_connect_ms')::float8, false);
    close_cadence interval;
BEGIN
    p := ROW(false, s.due_at, s.qr_born_after, s.qr_seen_at, s.qr_expires_at,
             CASE WHEN s.last_outcome IS NOT DISTINCT FROM r.outcome THEN s.repeats + 1 ELSE 0 END, false)::pgqr.plan;
    close_cadence := least(pgqr.seconds('close_poll_seconds') * 2 ^ least(p.repeats, 20),
                           pgqr.seconds('close_poll_max_seconds'));
    CASE r.outcome
    WHEN 'qr' THEN
        p.stale := r.md5 IS DISTINCT FROM s.qr_md5
                   AND coalesce(r.md5 = ANY(s.qr_history) OR (r.source = 'poll' AND s.qr_seen_at > started), false);
        p.changed := r.md5 IS DISTINCT FROM s.qr_md5 AND r.qr IS NOT NULL AND NOT p.stale;
        IF p.changed THEN
            p.repeats := 0;
            p.qr_seen_at := seen;
            -- and not before the image it replaced can have expired: Evolution makes the next one when the
            -- last one's life is over, so the window is the previous one's, not the whole gap between polls
            p.qr_born_after := CASE
                WHEN r.source = 'webhook' THEN seen
                WHEN slow THEN started
                ELSE least(seen, greatest(seen - life, CASE WHEN s.last_poll_at > seen - life THEN s.last_poll_at END,
                                          s.qr_born_after + life)) END;
            p.qr_expires_at := p.qr_born_after + life;
        ELSIF r.md5 IS NOT DISTINCT FROM s.qr_md5 THEN
            p.qr_born_after := greatest(s.qr_born_after, seen - life);
            p.qr_expires_at := p.qr_born_after + life;
        END IF;
        IF p.stale THEN
            p.due_at := CASE WHEN r.source = 'webhook' THEN s.due_at
                             ELSE greatest(coalesce(s.qr_expires_at + pgqr.seconds('rotation_margin_seconds'), at),
                                           at + rmin) END;
        ELSIF r.source = 'webhook' THEN
            p.due_at := greatest(coalesce(s.due_at, at), at + pgqr.seconds('webhook_safety_seconds'));
        ELSIF p.changed THEN
            p.due_at := greatest(p.qr_expires_at + pgqr.seconds('rotation_margin_seconds'), at + rmin);
        ELSIF slow THEN
            p.due_at := at + close_cadence;
        ELSIF at > s.qr_seen_at + life + rmax THEN
            -- overdue: Evolution stopped rotating this one (or its lifetime is longer than the setting)
            p.due_at := at + least(rmax * 2 ^ least(p.repeats, 10), pgqr.seconds('close_poll_max_seconds'));
        ELSE
            p.due_at := at + least(greatest((s.qr_seen_at + life - at) / 2, rmin), rmax);
        END IF;
    WHEN 'no_qr' THEN
        p.due_at := at + least(pgqr.seconds('no_qr_retry_seconds') * 2 ^ least(p.repeats, 10), interval '30 seconds');
    WHEN 'closed', 'gave_up' THEN
        p.due_at := at + close_cadence;
    WHEN 'failed' THEN
        p.due_at := at + pgqr.backoff(r.error_class, s.consecutive_failures + 1);
    WHEN 'connected' THEN
        p.due_at := NULL;
    ELSE  -- event: a state change reported by webhook
        IF r.evolution_state = 'close' AND r.source = 'webhook' THEN
            p.due_at := least(coalesce(s.due_at, at + close_cadence), at + close_cadence);
        END IF;
    END CASE;
    -- the rate cap (a poll's own claim is already counted in recent_polls)
    p.due_at := CASE WHEN p.due_at IS NOT NULL THEN greatest(p.due_at, pgqr.poll_floor(s.recent_polls)) END;
    RETURN p;
END
$$;

-- Write `writes` to the app's table; a write the table refuses (CHECK, trigger, RLS, exclusion, a type) costs
-- only its own row: it comes back with its SQLSTATE and message (the message only: a DETAIL may quote the row,
-- token and all). Serialization failures and deadlocks are not refusals: they fail the batch, to be retried.
CREATE FUNCTION pgqr.app_write_each(writes pgqr.app_write[]) RETURNS TABLE (key text, detail text)
LANGUAGE plpgsql AS $$
DECLARE
    w pgqr.app_write;
BEGIN
    BEGIN
        PERFORM pgqr.app_write(writes);
        RETURN;
    EXCEPTION WHEN OTHERS THEN
        IF SQLSTATE LIKE '40%' THEN
            RAISE;
        END IF;
    END;
    FOREACH w IN ARRAY writes LOOP
        BEGIN
            PERFORM pgqr.app_write(ARRAY[w]);
        EXCEPTION WHEN OTHERS THEN
            IF SQLSTATE LIKE '40%' THEN
                RAISE;
            END IF;
            key := w.key;
            detail := SQLSTATE || ': ' || left(SQLERRM, 300);
            RETURN NEXT;
        END;
    END LOOP;
END
$$;

-- The one write path, for polls and webhooks alike; one call per batch, set-based.
--   * A poll result writes only while its claim is the instance's pending one (claim_held); a webhook only
--     while the instance waits. A superseded result writes nothing, to the app's row or to pgqr's estimate.
--   * Nothing here waits for a lock: a row the app (or another writer) holds is reported busy and the caller
--     hands it in again; an app row no longer in a waiting status is never written (the state guard).
--   * A QR image is written only when it is new: never one the instance already had, never one older than
--     what was stored during the poll.
--   * A webhook that repeats the Evolution state pgqr already holds writes nothing at all.
--   * A row the app's table refuses is that instance's app_refused; the rest of the batch commits.
--   * Every poll and every webhook that changed something appends one refresh_log row; a new QR, a connect,
--     a give-up and a first failure send NOTIFY pgqr_qr_updated with the key and what happened (never a token,
--     never the QR).
-- Returns, per result: written (it took effect), claim_held (a poll's claim was still the instance's; a
-- webhook's instance was waiting), busy (hand it in again), qr_updated, the outcome recorded, and why it was
-- not written (superseded, not_waiting, busy, or the app's refusal) or that its image was already replaced.
CREATE FUNCTION pgqr.record_results(writer text, results jsonb)
RETURNS TABLE (key text, written boolean, claim_held boolean, busy boolean, qr_updated boolean, outcome text,
               reason text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    b       pgqr.binding;
    at      timestamptz := now();
    rs      pgqr.result[];
    held    text[];
    mine    text[];
    busy    text[];
    wants   text[];
    locked  text[];
    gone    text[] := '{}';
    writes  pgqr.app_write[];
    refused text[] := '{}';
    details text[] := '{}';
    stale   text[];
    changed text[];
    failing text[];
BEGIN
    SELECT * INTO b FROM pgqr.binding;
    -- one result per key (the last one wins), and webhook repeats dropped before anything is locked
    rs := ARRAY(
        SELECT r FROM (SELECT DISTINCT ON (x.key) x.* FROM jsonb_populate_recordset(NULL::pgqr.result, results)
                       WITH ORDINALITY AS x(key, source, outcome, md5, qr, pairing_code, qr_count, http_status,
                                            latency_ms, error_class, evolution_state, final, claim_id, n)
                       ORDER BY x.key, x.n DESC) r0
        CROSS JOIN LATERAL (SELECT ROW(r0.key, r0.source, r0.outcome, r0.md5, r0.qr, r0.pairing_code, r0.qr_count,
                                       r0.http_status, r0.latency_ms, r0.error_class, r0.evolution_state,
                                       r0.final, r0.claim_id)::pgqr.result AS r) y
        WHERE NOT (r0.source = 'webhook' AND r0.outcome = 'event' AND EXISTS (
            SELECT 1 FROM pgqr.instance_state s WHERE s.key = r0.key
               AND s.evolution_state IS NOT DISTINCT FROM r0.evolution_state)));

    -- the state rows we may write, locked in key order without waiting (the claim is checked on the locked row)
    mine := ARRAY(
        SELECT s.key FROM pgqr.instance_state s JOIN unnest(rs) r ON r.key = s.key
        WHERE (r.source = 'webhook' AND s.waiting) OR (r.source = 'poll' AND s.claim_id = r.claim_id)
        ORDER BY s.key FOR UPDATE OF s SKIP LOCKED);
    held := mine || ARRAY(
        SELECT r.key FROM unnest(rs) r JOIN pgqr.instance_state s ON s.key = r.key
        WHERE NOT r.key = ANY(mine)
          AND ((r.source = 'webhook' AND s.waiting) OR (r.source = 'poll' AND s.claim_id = r.claim_id)));
    busy := ARRAY(SELECT k FROM unnest(held) k WHERE NOT k = ANY(mine));

    -- results that write the app's row: lock those rows too (SKIP LOCKED; only rows still waiting)
    wants := ARRAY(
        SELECT r.key FROM unnest(rs) r JOIN pgqr.instance_state s ON s.key = r.key
        WHERE r.key = ANY(mine)
          AND ((r.outcome = 'qr' AND (pgqr.plan_next(s, r, at)).changed
                AND num_nonnulls(b.qr_column, b.qr_at_column, b.qr_expires_column, b.pairing_column) > 0)
               OR r.outcome = 'connected' OR (r.outcome = 'gave_up' AND b.gave_up_value IS NOT NULL)));
    IF cardinality(wants) > 0 THEN
        locked := ARRAY(SELECT pgqr.app_lock(wants));
        -- held by someone else: busy; no longer waiting (a change made with triggers off): not written
        gone := ARRAY(SELECT k FROM unnest(wants) k
                      WHERE NOT EXISTS (SELECT 1 FROM pgqr.app_rows(wants) a WHERE a.key = k AND a.waiting));
        busy := busy || ARRAY(SELECT k FROM unnest(wants) k WHERE NOT k = ANY(gone) AND NOT k = ANY(locked));
        mine := ARRAY(SELECT k FROM unnest(mine) k WHERE NOT k = ANY(busy) AND NOT k = ANY(gone));
        writes := ARRAY(
            SELECT ROW(r.key, CASE WHEN r.outcome = 'qr' THEN 'qr' ELSE r.outcome::text END, r.qr, r.pairing_code,
                       at, p.qr_expires_at)::pgqr.app_write
            FROM unnest(rs) r JOIN pgqr.instance_state s ON s.key = r.key, LATERAL pgqr.plan_next(s, r, at) p
            WHERE r.key = ANY(locked) AND r.key = ANY(mine));
        SELECT coalesce(array_agg(f.key), '{}'), coalesce(array_agg(f.detail), '{}') INTO refused, details
        FROM pgqr.app_write_each(writes) f;
    END IF;

    -- the bookkeeping, with the next due time and the QR estimate
    WITH planned AS (
        SELECT r.key, r.source, r.md5, r.qr, r.pairing_code, r.qr_count, r.http_status, r.latency_ms,
               r.evolution_state, p.due_at, p.qr_born_after, p.qr_seen_at, p.qr_expires_at, p.repeats, p.stale,
               f.n IS NOT NULL AS refused, details[f.n] AS detail,
               p.changed AND f.n IS NULL AS changed,
               CASE WHEN f.n IS NOT NULL THEN 'app_refused'::pgqr.outcome ELSE r.outcome END AS outcome,
               CASE WHEN f.n IS NOT NULL THEN 'app_refused' ELSE r.error_class END AS error_class
        FROM unnest(rs) r JOIN pgqr.instance_state s ON s.key = r.key
        CROSS JOIN LATERAL pgqr.plan_next(s, r, at) p
        LEFT JOIN unnest(refused) WITH ORDINALITY AS f(key, n) ON f.key = r.key
        WHERE r.key = ANY(mine)
    ), upd AS (
        UPDATE pgqr.instance_state s SET
            due_at = CASE WHEN x.refused
                          THEN greatest(at + pgqr.backoff('app_refused', s.consecutive_failures + 1),
                                        pgqr.poll_floor(s.recent_polls))
                          ELSE x.due_at END,
            claim_id = CASE WHEN x.source = 'poll' THEN NULL ELSE s.claim_id END,
            lease_owner = CASE WHEN x.source = 'poll' THEN NULL ELSE s.lease_owner END,
            lease_expires_at = CASE WHEN x.source = 'poll' THEN NULL ELSE s.lease_expires_at END,
            last_poll_at = CASE WHEN x.source = 'poll' THEN s.claimed_at ELSE s.last_poll_at END,
            last_outcome = x.outcome,
            last_error_class = x.error_class,
            last_http_status = coalesce(x.http_status, s.last_http_status),
            last_latency_ms = CASE WHEN x.source = 'poll' THEN x.latency_ms ELSE s.last_latency_ms END,
            last_success_at = CASE WHEN x.outcome IN ('qr', 'no_qr', 'connected', 'closed') THEN at
                                   ELSE s.last_success_at END,
            consecutive_failures = CASE WHEN x.outcome IN ('failed', 'app_refused') THEN s.consecutive_failures + 1
                                        WHEN x.outcome = 'event' THEN s.consecutive_failures ELSE 0 END,
            repeats = x.repeats,
            evolution_state = coalesce(x.evolution_state, s.evolution_state),
            evolution_state_at = CASE WHEN x.evolution_state IS NOT NULL THEN at ELSE s.evolution_state_at END,
            qr_history = CASE WHEN x.changed OR x.outcome IN ('connected', 'gave_up')
                              THEN pgqr.history_with(s.qr_history, s.qr_md5) ELSE s.qr_history END,
            qr_md5 = CASE WHEN x.changed THEN x.md5 WHEN x.outcome IN ('connected', 'gave_up') THEN NULL ELSE s.qr_md5 END,
            qr_seen_at = CASE WHEN x.refused THEN s.qr_seen_at ELSE x.qr_seen_at END,
            qr_born_after = CASE WHEN x.refused THEN s.qr_born_after ELSE x.qr_born_after END,
            qr_expires_at = CASE WHEN x.outcome IN ('connected', 'gave_up') THEN NULL
                                 WHEN x.refused THEN s.qr_expires_at ELSE x.qr_expires_at END,
            qr_source = CASE WHEN x.changed THEN x.source ELSE s.qr_source END,
            qr_count = coalesce(x.qr_count, s.qr_count),
            qr = CASE WHEN x.changed AND b.qr_column IS NULL THEN x.qr
                      WHEN x.outcome IN ('connected', 'gave_up') THEN NULL ELSE s.qr END,
            pairing_code = CASE WHEN x.changed AND b.pairing_column IS NULL THEN x.pairing_code
                                WHEN x.outcome IN ('connected', 'gave_up') THEN NULL ELSE s.pairing_code END
          FROM planned x
         WHERE s.key = x.key
        RETURNING s.name AS instance_name, s.qr_expires_at AS expires_at, s.consecutive_failures AS failures, x.*
    ), logged AS (
        INSERT INTO pgqr.refresh_log (instance_key, instance_name, source, outcome, written, qr_updated,
                                      http_status, latency_ms, error_class, owner, detail)
        SELECT u.key, u.instance_name, u.source, u.outcome, NOT u.refused, u.changed, u.http_status, u.latency_ms,
               u.error_class, writer, u.detail
        FROM upd u
        RETURNING 1
    )
    SELECT array_agg(u.key) FILTER (WHERE u.changed),
           array_agg(u.key) FILTER (WHERE u.stale),
           array_agg(u.key) FILTER (WHERE (u.outcome = 'failed' AND u.failures = 1) OR u.refused),
           array_agg(ROW(u.key, CASE WHEN u.changed THEN 'qr' ELSE u.outcome::text END, NULL, NULL, NULL,
                         u.expires_at)::pgqr.app_write)
             FILTER (WHERE u.changed OR u.outcome IN ('connected', 'gave_up'))
      INTO changed, stale, failing, writes
      FROM upd u;

    PERFORM pg_notify('pgqr_qr_updated', json_build_object(
                'key', left(w.key, 200), 'event', w.kind, 'expires_at', w.qr_expires_at)::text)
       FROM unnest(writes) w;
    -- a first failure (or a refusal) is news for whoever shows this instance (the live page); later ones are not
    PERFORM pg_notify('pgqr_qr_updated', json_build_object('key', left(k, 200), 'event', 'failed')::text)
       FROM unnest(failing) k;

    -- polls whose claim was superseded (or whose row left waiting), and the last hand-in of one still kept busy,
    -- are logged as not written: the call did happen
    INSERT INTO pgqr.refresh_log (instance_key, instance_name, source, outcome, written, qr_updated, http_status,
                                  latency_ms, error_class, owner, detail)
    SELECT r.key, coalesce(s.name, ''), r.source, r.outcome, false, false, r.http_status, r.latency_ms,
           r.error_class, writer,
           CASE WHEN r.key = ANY(busy) THEN 'busy' WHEN r.key = ANY(gone) THEN 'not_waiting' ELSE 'superseded' END
    FROM unnest(rs) r LEFT JOIN pgqr.instance_state s ON s.key = r.key
    WHERE NOT r.key = ANY(mine) AND (NOT r.key = ANY(busy) OR coalesce(r.final, false)) AND r.source = 'poll';

    RETURN QUERY
    SELECT r.key, r.key = ANY(mine) AND NOT r.key = ANY(refused), r.key = ANY(held),
           r.key = ANY(busy) AND NOT coalesce(r.final, false),
           r.key = ANY(coalesce(changed, '{}')),
           CASE WHEN r.key = ANY(refused) THEN 'app_refused' ELSE r.outcome::text END,
           CASE WHEN r.key = ANY(refused) THEN details[array_position(refused, r.key)]
                WHEN r.key = ANY(busy) THEN 'busy'
                WHEN r.key = ANY(gone) THEN 'not_waiting'
                WHEN NOT r.key = ANY(held) THEN CASE WHEN r.source = 'poll' THEN 'superseded' ELSE 'not_waiting' END
                WHEN r.key = ANY(coalesce(stale, '{}')) THEN 'image_already_replaced' END
    FROM unnest(rs) r;
END
$$;

-- On shutdown: give back what this listener still holds (calls that never finished), due again at once as far
-- as the rate cap allows, so another replica can take it.
CREATE OR REPLACE FUNCTION pgqr.release_leases(lease_holder text) RETURNS integer
LANGUAGE sql AS $$
    WITH released AS (
        UPDATE pgqr.instance_state
           SET lease_owner = NULL, lease_expires_at = NULL, claim_id = NULL,
               due_at = CASE WHEN waiting THEN least(due_at, greatest(now(), pgqr.poll_floor(recent_polls))) END
         WHERE lease_owner = lease_holder
        RETURNING 1
    )
    SELECT count(*)::integer FROM released
$$;

-- What pgqr does when an app row changes under it: one rule for the trigger (one row) and the tick's sync (the
-- rows changed with triggers off). A row that starts or stops waiting, or whose call target moved (its name,
-- Evolution URL or token changed), has its pending claim superseded; one that starts waiting, or moved while
-- waiting, is due now as far as the rate cap allows, with a fresh count of failures and repeats. Returns the keys
-- that started waiting (the trigger wakes the listeners for them).
CREATE TYPE pgqr.app_change AS (key text, name text, waiting boolean, moved boolean);

CREATE FUNCTION pgqr.track(changes pgqr.app_change[]) RETURNS TABLE (key text, started boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    c        pgqr.app_change[] := ARRAY(SELECT DISTINCT ON (x.key) ROW(x.key, coalesce(x.name, ''),
                                               coalesce(x.waiting, false), coalesce(x.moved, false))::pgqr.app_change
                                        FROM unnest(changes) x);
    added    text[];
    starting text[];
BEGIN
    WITH ins AS (
        INSERT INTO pgqr.instance_state (key, name, waiting, due_at)
        SELECT x.key, x.name, x.waiting, CASE WHEN x.waiting THEN now() END FROM unnest(c) x
        ON CONFLICT (key) DO NOTHING
        RETURNING key, waiting)
    SELECT coalesce(array_agg(i.key), '{}'), coalesce(array_agg(i.key) FILTER (WHERE i.waiting), '{}')
      INTO added, starting FROM ins i;
    -- lock in key order (the trigger and the sync never deadlock), then read what changes
    PERFORM 1 FROM pgqr.instance_state s JOIN unnest(c) x ON x.key = s.key
     WHERE NOT s.key = ANY(added) ORDER BY s.key FOR UPDATE OF s;
    starting := starting || ARRAY(SELECT s.key FROM pgqr.instance_state s JOIN unnest(c) x ON x.key = s.key
                                  WHERE x.waiting AND NOT s.waiting AND NOT s.key = ANY(added));
    RETURN QUERY
    UPDATE pgqr.instance_state s
       SET name = x.name,
           waiting = x.waiting,
           claim_id = NULL, lease_owner = NULL, lease_expires_at = NULL,
           due_at = CASE WHEN NOT x.waiting THEN NULL
                         WHEN s.key = ANY(starting) OR x.moved OR s.name IS DISTINCT FROM x.name
                         THEN greatest(now(), pgqr.poll_floor(s.recent_polls)) ELSE s.due_at END,
           connecting_since = CASE WHEN s.key = ANY(starting) THEN now() ELSE s.connecting_since END,
           consecutive_failures = CASE WHEN s.key = ANY(starting) THEN 0 ELSE s.consecutive_failures END,
           repeats = CASE WHEN s.key = ANY(starting) THEN 0 ELSE s.repeats END,
           -- the app may have cleared its QR (or the row now names another instance): the next image is news
           qr_md5 = CASE WHEN s.key = ANY(starting) OR x.moved THEN NULL ELSE s.qr_md5 END
      FROM unnest(c) x
     WHERE s.key = x.key AND NOT s.key = ANY(added)
       AND (s.name IS DISTINCT FROM x.name OR s.waiting IS DISTINCT FROM x.waiting OR (x.moved AND s.waiting))
    RETURNING s.key, s.key = ANY(starting);
    RETURN QUERY SELECT k, k = ANY(starting) FROM unnest(added) k;
END
$$;

-- Bring pgqr.instance_state in step with the app's rows: rows written with triggers off (a bulk load,
-- session_replication_role = replica), rows that existed before binding. Run by every tick.
CREATE OR REPLACE FUNCTION pgqr.sync_instances() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
    changed integer;
BEGIN
    SELECT count(*) INTO changed FROM pgqr.track(ARRAY(
        SELECT ROW(a.key, coalesce(a.name, ''), coalesce(a.waiting, false), false)::pgqr.app_change
        FROM pgqr.app_instances a LEFT JOIN pgqr.instance_state s ON s.key = a.key
        WHERE s.key IS NULL OR s.name IS DISTINCT FROM coalesce(a.name, '')
           OR s.waiting IS DISTINCT FROM coalesce(a.waiting, false)));
    DELETE FROM pgqr.instance_state s WHERE NOT EXISTS (SELECT 1 FROM pgqr.app_instances a WHERE a.key = s.key);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN changed + n;
END
$$;

-- The trigger on the app's table, now through pgqr.track(); it also fires when the Evolution URL or the token
-- changes (a call made for the old one must not write). The view and the functions that read and write the app's
-- rows are 0003's, unchanged: install_binding() keeps its name and calls both.
ALTER FUNCTION pgqr.install_binding(pgqr.binding) RENAME TO install_app_access;

CREATE FUNCTION pgqr.install_trigger(b pgqr.binding) RETURNS void
LANGUAGE plpgsql AS $gen$
DECLARE
    tbl    text := pgqr.qualified(to_regclass(b.table_name));
    target text[] := array_remove(ARRAY[b.name_column, b.url_column, b.token_column], NULL);
    moved  text;
BEGIN
    moved := format('ROW(%s) IS DISTINCT FROM ROW(%s)',
                    (SELECT string_agg(format('OLD.%I::text', c), ', ') FROM unnest(target) c),
                    (SELECT string_agg(format('NEW.%I::text', c), ', ') FROM unnest(target) c));
    -- It runs as pgqr's owner with a pinned search_path (an app role such as Supabase's `authenticated` has no
    -- rights on schema pgqr) and never aborts the app's statement: an error becomes a WARNING and a row in
    -- pgqr.trigger_errors.
    EXECUTE format($trg$
        CREATE OR REPLACE FUNCTION pgqr.on_app_change() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgqr AS $body$
        DECLARE
            k text;
        BEGIN
            BEGIN
                IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND OLD.%1$I::text IS DISTINCT FROM NEW.%1$I::text) THEN
                    DELETE FROM pgqr.instance_state WHERE key = OLD.%1$I::text;
                    IF TG_OP = 'DELETE' THEN
                        RETURN NULL;
                    END IF;
                END IF;
                k := NEW.%1$I::text;
                IF EXISTS (SELECT 1 FROM pgqr.track(ARRAY[ROW(
                        k, NEW.%4$I::text, coalesce(NEW.%2$I::text = ANY(%3$L::text[]), false),
                        TG_OP = 'UPDATE' AND %5$s)::pgqr.app_change]) t WHERE t.started) THEN
                    -- the key, not the name: a NOTIFY payload over 8000 bytes would fail the app's statement
                    PERFORM pg_notify('pgqr_refresh', json_build_object('reason', 'waiting', 'key', left(k, 200))::text);
                END IF;
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'pgqr: bookkeeping for a row of %% failed (%%); the statement goes on', TG_TABLE_NAME, SQLERRM;
                BEGIN
                    INSERT INTO pgqr.trigger_errors (message) VALUES (left(SQLERRM, 500));
                EXCEPTION WHEN OTHERS THEN
                    NULL;
                END;
            END;
            RETURN NULL;
        END
        $body$$trg$, b.key_column, b.status_column, b.waiting_values, b.name_column, moved);
    EXECUTE format('DROP TRIGGER IF EXISTS pgqr_instance_change ON %s', tbl);
    -- the key may also be the name (a table keyed by instance name): UPDATE OF refuses a column named twice
    EXECUTE format('CREATE TRIGGER pgqr_instance_change AFTER INSERT OR DELETE OR UPDATE OF %s ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION pgqr.on_app_change()',
                   (SELECT string_agg(DISTINCT quote_ident(c), ', ')
                    FROM unnest(ARRAY[b.key_column, b.status_column] || target) c), tbl);
END
$gen$;

CREATE FUNCTION pgqr.install_binding(b pgqr.binding) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgqr.install_app_access(b);
    PERFORM pgqr.install_trigger(b);
END
$$;

-- An existing binding gets the new trigger now.
SELECT pgqr.install_trigger(b) FROM pgqr.binding b WHERE to_regclass(b.table_name) IS NOT NULL;
