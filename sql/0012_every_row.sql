-- pgqr 0012: Evolution's state for every bound row.
--
-- * A binding may have no status column (--status-column none). Evolution's last confirmed state is then the only
--   source of "waiting": a row waits while Evolution says `connecting`. The view, the claim, the trigger and the
--   tick's sync all read that one expression (pgqr.waiting_sql), so none of them overwrites it from a column that
--   is not there.
-- * Every observation of Evolution's state (a webhook, a poll, the sidecar's sweep) goes through pgqr.observe: the
--   state, its reason, when it last changed (durable) and when it was last seen and last read from connectionState
--   (pgqr.schedule: unlogged, an unchanged observation costs no WAL).
-- * A connected instance that Evolution reports closed or gone is a pending drop. It is confirmed when the state
--   has held for disconnect_after_seconds and a connectionState read made after that agrees (Evolution's reconnect
--   loops flap close/connecting many times a minute; a logout or a delete needs no hold, only the read). Then
--   dropped_at is set and, where the binding has a disconnected value, that value is written while the row still
--   holds the connected value (the app's later writes win).
-- * `not_found` is not a drop while no other row of the same Evolution server is found: every row of one server
--   missing is that server's problem (a wrong base URL), which pgqr.missing_servers() and an alert name.

ALTER TYPE pgqr.source ADD VALUE IF NOT EXISTS 'sweep';  -- used only inside function bodies (run after commit)

ALTER TABLE pgqr.binding
    ALTER COLUMN status_column DROP NOT NULL,
    ALTER COLUMN status_type DROP NOT NULL,
    ADD COLUMN disconnected_value text;  -- written when a connected instance drops; NULL: never
COMMENT ON COLUMN pgqr.binding.status_column IS 'NULL: no status column; Evolution''s state decides waiting';

ALTER TABLE pgqr.instance_state
    -- why Evolution's state is what it is: logged_out, deleted, qr_limit or a connection.update statusReason
    ADD COLUMN evolution_reason   text,
    -- a connected instance reported closed or gone at this time, not yet confirmed (or confirmed: dropped_at)
    ADD COLUMN drop_pending_since timestamptz,
    ADD COLUMN dropped_at         timestamptz;
COMMENT ON COLUMN pgqr.instance_state.evolution_state IS 'open | connecting | close | not_found, as last observed';
CREATE INDEX instance_state_drops_idx ON pgqr.instance_state (drop_pending_since)
    WHERE drop_pending_since IS NOT NULL AND dropped_at IS NULL;
-- what the connections_dropped rule and the /metrics gauge count: a few rows, never a scan of all of them
CREATE INDEX instance_state_dropped_idx ON pgqr.instance_state (dropped_at) WHERE dropped_at IS NOT NULL;

ALTER TABLE pgqr.schedule
    ADD COLUMN state_seen_at    timestamptz,  -- the last observation that agreed with the state held
    ADD COLUMN state_checked_at timestamptz;  -- the last connectionState read (or poll) that agreed with it

INSERT INTO pgqr.settings (key, value, type, min_value, description) VALUES
    ('sweep_seconds', '300', 'seconds', 10,
     'How often the sidecar reads Evolution''s state of every row that is not waiting (spread over the period).'),
    ('disconnect_after_seconds', '60', 'seconds', 0,
     'A connected instance reported closed counts as dropped once that has held this long and connectionState '
     'agrees (a logout or a delete needs only connectionState).'),
    ('alert_dropped_window', '15 minutes', 'interval', 1,
     'Alert connections_dropped: connected instances that dropped this recently and have not connected again.');

-- "The row waits for a QR", as SQL over the app's row `alias` whose key, as text, is `row_key`: its status among
-- the waiting values, or, without a status column, Evolution's last observed state `connecting`.
CREATE FUNCTION pgqr.waiting_sql(b pgqr.binding, alias text, row_key text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN b.status_column IS NULL
                THEN format('coalesce((SELECT w.evolution_state = ''connecting'' FROM pgqr.instance_state w '
                            'WHERE w.key = %s), false)', row_key)
                ELSE format('coalesce(%s.%I::text = ANY(%L::text[]), false)', alias, b.status_column, b.waiting_values)
           END
$$;

-- Every problem with a binding, one line each (0003's, and a binding without a status column).
CREATE OR REPLACE FUNCTION pgqr.binding_problems(b pgqr.binding) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    tbl      regclass := to_regclass(b.table_name);
    kind     "char";
    problems text[] := '{}';
    col      record;
    refusal  text;
    v        text;
BEGIN
    IF tbl IS NULL THEN
        RETURN ARRAY[format('table %s does not exist', b.table_name)];
    END IF;
    SELECT relkind INTO kind FROM pg_class WHERE oid = tbl;
    IF kind NOT IN ('r', 'p') THEN
        RETURN ARRAY[format('%s is a %s, not a table: bind the table it reads from', tbl,
                            CASE kind WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' ELSE 'relation' END)];
    END IF;
    FOR col IN SELECT * FROM (VALUES
            ('key', b.key_column, NULL), ('name', b.name_column, 'S'), ('status', b.status_column, 'S'),
            ('token', b.token_column, 'S'), ('url', b.url_column, 'S'), ('qr', b.qr_column, 'S'),
            ('qr-at', b.qr_at_column, 'D'), ('qr-expires', b.qr_expires_column, 'D'),
            ('pairing', b.pairing_column, 'S'), ('phone', b.phone_column, 'S')) AS x(role, name, category)
            WHERE x.name IS NOT NULL LOOP
        IF pgqr.column_type(tbl, col.name) IS NULL THEN
            problems := problems || format('%s has no column %I (the %s column)', tbl, col.name, col.role);
        ELSIF col.category = 'S' AND pgqr.column_category(tbl, col.name) NOT IN ('S', 'E') THEN
            problems := problems || format('column %I (the %s column) is %s, not text-like', col.name, col.role,
                                           pgqr.column_type(tbl, col.name));
        ELSIF col.category = 'D' AND pgqr.column_type(tbl, col.name) !~
                '^timestamp(\(\d\))? with(out)? time zone$' THEN
            problems := problems || format('column %I (the %s column) is %s, not a timestamp', col.name, col.role,
                                           pgqr.column_type(tbl, col.name));
        END IF;
    END LOOP;
    IF pgqr.column_type(tbl, b.key_column) IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM pg_index x JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
            WHERE x.indrelid = tbl AND x.indisunique AND x.indnkeyatts = 1 AND x.indpred IS NULL
              AND x.indexprs IS NULL AND a.attname = b.key_column AND a.attnotnull) THEN
        problems := problems || format('column %I is not a unique, NOT NULL key of %s', b.key_column, tbl);
    END IF;
    IF b.status_column IS NULL THEN
        -- nothing to write them to: say so rather than ignore a value the user meant
        IF b.gave_up_value IS NOT NULL OR b.disconnected_value IS NOT NULL THEN
            problems := problems || 'the gave-up and disconnected values need a status column to be written to'::text;
        END IF;
        RETURN problems;
    END IF;
    IF cardinality(b.waiting_values) = 0 THEN
        problems := problems || 'give at least one waiting status value'::text;
    END IF;
    IF b.connected_value = ANY(b.waiting_values) OR b.gave_up_value = ANY(b.waiting_values)
       OR b.disconnected_value = ANY(b.waiting_values) THEN
        problems := problems || 'the connected, gave-up and disconnected values must not be waiting values'::text;
    END IF;
    IF b.disconnected_value = b.connected_value THEN
        problems := problems || 'the disconnected value must differ from the connected value'::text;
    END IF;
    -- probed whenever the status column is there, so one run lists this problem beside any other
    IF pgqr.column_category(tbl, b.status_column) IN ('S', 'E') THEN
        FOREACH v IN ARRAY array_remove(b.waiting_values || b.connected_value || b.gave_up_value
                                        || b.disconnected_value, NULL) LOOP
            refusal := pgqr.value_refused(tbl, b.status_column, v);
            IF refusal IS NOT NULL THEN
                problems := problems || format('column %I cannot hold %L: %s', b.status_column, v, refusal);
            END IF;
        END LOOP;
    END IF;
    RETURN problems;
END
$$;

-- bind() (0003's) with the disconnected value, and a status column that may be NULL.
DROP FUNCTION pgqr.bind(text, text, text, text[], text, text, text, text, text, text, text, text, text, text);
CREATE FUNCTION pgqr.bind(
    table_name text, name_column text, status_column text,
    waiting_values text[] DEFAULT '{connecting}', connected_value text DEFAULT 'connected',
    gave_up_value text DEFAULT NULL, key_column text DEFAULT NULL,
    token_column text DEFAULT NULL, url_column text DEFAULT NULL, qr_column text DEFAULT NULL,
    qr_at_column text DEFAULT NULL, qr_expires_column text DEFAULT NULL, pairing_column text DEFAULT NULL,
    phone_column text DEFAULT NULL, disconnected_value text DEFAULT NULL)
RETURNS pgqr.binding
LANGUAGE plpgsql AS $$
DECLARE
    tbl      regclass := to_regclass(table_name);
    b        pgqr.binding;
    old      pgqr.binding;
    problems text[];
BEGIN
    -- only a table has a primary key to default to; a view is refused below with a message that says so
    IF key_column IS NULL AND (SELECT relkind FROM pg_class WHERE oid = tbl) IN ('r', 'p') THEN
        SELECT CASE WHEN count(*) = 1 THEN min(a.attname) END INTO key_column
        FROM pg_index x JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = ANY(x.indkey)
        WHERE x.indrelid = tbl AND x.indisprimary;
        IF key_column IS NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('%s has no single-column primary key: name a unique NOT NULL column as the key', tbl);
        END IF;
    END IF;
    b := ROW(true, coalesce(pgqr.qualified(tbl), table_name), key_column, pgqr.column_type(tbl, key_column),
             name_column, status_column, pgqr.column_type(tbl, status_column), waiting_values, connected_value,
             gave_up_value, token_column, url_column, qr_column, qr_at_column, qr_expires_column, pairing_column,
             phone_column, now(), disconnected_value)::pgqr.binding;
    problems := pgqr.binding_problems(b);
    IF cardinality(problems) > 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'cannot bind: ' || array_to_string(problems, E'\n');
    END IF;
    SELECT * INTO old FROM pgqr.binding;
    IF FOUND AND to_regclass(old.table_name) IS NOT NULL THEN
        EXECUTE format('DROP TRIGGER IF EXISTS pgqr_instance_change ON %s', to_regclass(old.table_name));
    END IF;
    IF FOUND AND (old.table_name, old.key_column) IS DISTINCT FROM (b.table_name, b.key_column) THEN
        DELETE FROM pgqr.schedule;
        DELETE FROM pgqr.instance_state;   -- keyed by another table's keys
    END IF;
    DELETE FROM pgqr.binding;
    INSERT INTO pgqr.binding VALUES (b.*);
    PERFORM pgqr.install_binding(b);
    PERFORM pgqr.sync_instances();
    RETURN b;
END
$$;

-- The binding's view and the functions that read and lock the app's rows (0010's, with pgqr.waiting_sql), and the
-- lock a disconnection takes: rows that still hold the connected value, SKIP LOCKED.
CREATE OR REPLACE FUNCTION pgqr.install_app_access(b pgqr.binding) RETURNS void
LANGUAGE plpgsql AS $gen$
DECLARE
    tbl      text := pgqr.qualified(to_regclass(b.table_name));
    waiting  text := pgqr.waiting_sql(b, 't', format('t.%I::text', b.key_column));
    cols     text;
    key_eq   text := format('t.%I = ANY(keys::%s[])', b.key_column, b.key_type);
    connected text := CASE WHEN b.status_column IS NULL THEN 'false'
                           ELSE format('t.%I::text = %L', b.status_column, b.connected_value) END;
BEGIN
    cols := format('%s AS key, %s AS name, %s AS status, %s AS token, %s AS url, %s AS qr, %s AS qr_at, '
                   '%s AS pairing_code, %s AS phone, %s AS waiting',
                   pgqr.bound(b.key_column), pgqr.bound(b.name_column), pgqr.bound(b.status_column),
                   pgqr.bound(b.token_column), pgqr.bound(b.url_column), pgqr.bound(b.qr_column),
                   pgqr.bound(b.qr_at_column, 'timestamptz'), pgqr.bound(b.pairing_column),
                   pgqr.bound(b.phone_column), waiting);
    EXECUTE format('CREATE OR REPLACE VIEW pgqr.app_instances AS SELECT %s FROM %s t', cols, tbl);
    EXECUTE format($f$CREATE OR REPLACE FUNCTION pgqr.app_rows(keys text[]) RETURNS SETOF pgqr.app_instances
                      LANGUAGE sql STABLE AS 'SELECT %s FROM %s t WHERE %s'$f$,
                   replace(cols, '''', ''''''), tbl, replace(key_eq, '''', ''''''));
    -- SKIP LOCKED: a row the app holds costs that one instance this write (it is retried), never the batch
    EXECUTE format($f$CREATE OR REPLACE FUNCTION pgqr.app_lock(keys text[]) RETURNS SETOF text
                      LANGUAGE sql AS 'SELECT t.%I::text FROM %s t WHERE %s AND %s FOR UPDATE OF t SKIP LOCKED'$f$,
                   b.key_column, tbl, replace(key_eq, '''', ''''''), replace(waiting, '''', ''''''));
    EXECUTE format($f$CREATE OR REPLACE FUNCTION pgqr.app_lock_connected(keys text[]) RETURNS SETOF text
                      LANGUAGE sql AS 'SELECT t.%I::text FROM %s t WHERE %s AND %s FOR UPDATE OF t SKIP LOCKED'$f$,
                   b.key_column, tbl, replace(key_eq, '''', ''''''), replace(connected, '''', ''''''));
END
$gen$;

-- The writes (0010's), each guarded by the app's own status, with pgqr.waiting_sql, and one more kind:
-- 'disconnected' writes the disconnected value, only while the row holds the connected value.
CREATE OR REPLACE FUNCTION pgqr.install_app_write(b pgqr.binding) RETURNS void
LANGUAGE plpgsql AS $gen$
DECLARE
    tbl     text := pgqr.qualified(to_regclass(b.table_name));
    waiting text := pgqr.waiting_sql(b, 't', format('t.%I::text', b.key_column));
    sets    text;
    olds    text[];
    news    text[];
    body    text := '';
BEGIN
    sets := concat_ws(', ',
        CASE WHEN b.qr_column IS NOT NULL THEN format('%I = coalesce(w.qr, t.%I)', b.qr_column, b.qr_column) END,
        CASE WHEN b.qr_at_column IS NOT NULL THEN format('%I = w.qr_at', b.qr_at_column) END,
        CASE WHEN b.qr_expires_column IS NOT NULL THEN format('%I = w.qr_expires_at', b.qr_expires_column) END,
        CASE WHEN b.pairing_column IS NOT NULL THEN format('%I = w.pairing_code', b.pairing_column) END);
    IF b.qr_column IS NOT NULL OR b.pairing_column IS NOT NULL THEN
        olds := array_remove(ARRAY[CASE WHEN b.qr_column IS NOT NULL THEN format('t.%I::text', b.qr_column) END,
                                   CASE WHEN b.pairing_column IS NOT NULL
                                        THEN format('t.%I::text', b.pairing_column) END], NULL);
        news := array_remove(ARRAY[CASE WHEN b.qr_column IS NOT NULL
                                        THEN format('coalesce(w.qr, t.%I::text)', b.qr_column) END,
                                   CASE WHEN b.pairing_column IS NOT NULL THEN 'w.pairing_code' END], NULL);
    ELSIF b.qr_expires_column IS NOT NULL THEN
        olds := ARRAY[format('t.%I::timestamptz', b.qr_expires_column)];
        news := ARRAY['w.qr_expires_at'];
    END IF;
    IF sets <> '' THEN
        body := body || format('UPDATE %s t SET %s FROM unnest(writes) w WHERE w.kind = ''qr'' AND t.%I = w.key::%s '
                               'AND %s%s; ',
                               tbl, sets, b.key_column, b.key_type, waiting,
                               CASE WHEN olds IS NOT NULL
                                    THEN format(' AND ROW(%s, 0) IS DISTINCT FROM ROW(%s, 0)',
                                                array_to_string(olds, ', '), array_to_string(news, ', '))
                                    ELSE '' END);
    END IF;
    sets := concat_ws(', ',
        CASE WHEN b.status_column IS NOT NULL
             THEN format('%I = %L::%s', b.status_column, b.connected_value, b.status_type) END,
        CASE WHEN b.qr_column IS NOT NULL THEN format('%I = NULL', b.qr_column) END,
        CASE WHEN b.pairing_column IS NOT NULL THEN format('%I = NULL', b.pairing_column) END);
    IF sets <> '' THEN
        body := body || format('UPDATE %s t SET %s FROM unnest(writes) w WHERE w.kind = ''connected'' '
                               'AND t.%I = w.key::%s AND %s; ', tbl, sets, b.key_column, b.key_type, waiting);
    END IF;
    IF b.gave_up_value IS NOT NULL THEN
        body := body || format('UPDATE %s t SET %I = %L::%s FROM unnest(writes) w WHERE w.kind = ''gave_up'' AND t.%I = w.key::%s AND %s; ',
                               tbl, b.status_column, b.gave_up_value, b.status_type, b.key_column, b.key_type, waiting);
    END IF;
    IF b.disconnected_value IS NOT NULL THEN
        body := body || format('UPDATE %s t SET %I = %L::%s FROM unnest(writes) w WHERE w.kind = ''disconnected'' '
                               'AND t.%I = w.key::%s AND t.%I::text = %L; ',
                               tbl, b.status_column, b.disconnected_value, b.status_type, b.key_column, b.key_type,
                               b.status_column, b.connected_value);
    END IF;
    EXECUTE format('CREATE OR REPLACE FUNCTION pgqr.app_write(writes pgqr.app_write[]) RETURNS SETOF text '
                   'LANGUAGE plpgsql AS %L',
                   'BEGIN ' || body || 'RETURN QUERY SELECT w.key FROM unnest(writes) w; END');
END
$gen$;

-- The trigger on the app's table (0010's), with pgqr.waiting_sql: without a status column it fires on the key,
-- name, URL and token only, and a row's waiting is what Evolution last said of it.
CREATE OR REPLACE FUNCTION pgqr.install_trigger(b pgqr.binding) RETURNS void
LANGUAGE plpgsql AS $gen$
DECLARE
    tbl    text := pgqr.qualified(to_regclass(b.table_name));
    target text[] := array_remove(ARRAY[b.name_column, b.url_column, b.token_column], NULL);
    moved  text;
    waits  text;
BEGIN
    moved := format('ROW(%s) IS DISTINCT FROM ROW(%s)',
                    (SELECT string_agg(format('OLD.%I::text', c), ', ') FROM unnest(target) c),
                    (SELECT string_agg(format('NEW.%I::text', c), ', ') FROM unnest(target) c));
    waits := pgqr.waiting_sql(b, 'NEW', 'k');
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
                    DELETE FROM pgqr.schedule WHERE key = OLD.%1$I::text;
                    DELETE FROM pgqr.instance_state WHERE key = OLD.%1$I::text;
                    IF TG_OP = 'DELETE' THEN
                        RETURN NULL;
                    END IF;
                END IF;
                k := NEW.%1$I::text;
                IF EXISTS (SELECT 1 FROM pgqr.track(ARRAY[ROW(
                        k, NEW.%2$I::text, %3$s, TG_OP = 'UPDATE' AND %4$s)::pgqr.app_change]) t WHERE t.started) THEN
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
        $body$$trg$, b.key_column, b.name_column, waits, moved);
    EXECUTE format('DROP TRIGGER IF EXISTS pgqr_instance_change ON %s', tbl);
    -- the key may also be the name (a table keyed by instance name): UPDATE OF refuses a column named twice
    EXECUTE format('CREATE TRIGGER pgqr_instance_change AFTER INSERT OR DELETE OR UPDATE OF %s ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION pgqr.on_app_change()',
                   (SELECT string_agg(DISTINCT quote_ident(c), ', ')
                    FROM unnest(array_remove(ARRAY[b.key_column, b.status_column] || target, NULL)) c), tbl);
END
$gen$;

-- The Evolution server a row is called on, as people may see it: scheme, host and port of its URL column (no
-- credentials, path or query), or EVOLUTION_API_URL for a row without one.
CREATE FUNCTION pgqr.server_label(url text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN coalesce(url, '') = '' THEN 'EVOLUTION_API_URL'
                ELSE regexp_replace(url, '^\s*([A-Za-z][A-Za-z0-9+.-]*://)?([^/?#]*@)?([^/?#]*).*$', '\1\3') END
$$;

-- Evolution servers on which every bound row is not found: a wrong base URL or the wrong Evolution, not as many
-- deleted instances.
CREATE FUNCTION pgqr.missing_servers()
RETURNS TABLE (server text, instances integer, since timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT pgqr.server_label(min(a.url)), count(*)::integer, max(s.evolution_state_at)
    FROM pgqr.app_instances a JOIN pgqr.instance_state s ON s.key = a.key
    GROUP BY coalesce(a.url, '')
    HAVING bool_and(coalesce(s.evolution_state = 'not_found', false))
    ORDER BY 1
$$;

-- Confirm the pending drops among `among` (every key when NULL): those whose state has held long enough and that a
-- connectionState read made since agrees with. Each gets dropped_at, a refresh_log row and NOTIFY pgqr_qr_updated
-- {"key", "event": "disconnected"}; where the binding has a disconnected value it is written to rows that still
-- hold the connected value (a row the app holds is left for the next confirmation; a refusal costs that row).
-- Returns the keys confirmed.
CREATE FUNCTION pgqr.settle_drops(writer text, among text[] DEFAULT NULL) RETURNS SETOF text
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    b       pgqr.binding;
    hold    interval := pgqr.seconds('disconnect_after_seconds');
    due     text[];
    still   text[] := '{}';
    locked  text[] := '{}';
    refused text[] := '{}';
    details text[] := '{}';
BEGIN
    SELECT * INTO b FROM pgqr.binding;
    due := ARRAY(
        SELECT s.key FROM pgqr.instance_state s JOIN pgqr.schedule q ON q.key = s.key
        WHERE s.drop_pending_since IS NOT NULL AND s.dropped_at IS NULL AND (among IS NULL OR s.key = ANY(among))
          AND q.state_checked_at >= s.evolution_state_at
                                    + CASE WHEN s.evolution_reason IN ('logged_out', 'deleted') THEN '0'::interval
                                           ELSE hold END
        ORDER BY s.key);
    -- not found is a drop only where the same server was seen to know another row since (a deleted instance, which
    -- Evolution said so of, needs no such proof)
    due := ARRAY(
        SELECT a.key FROM pgqr.app_rows(due) a JOIN pgqr.instance_state s ON s.key = a.key
        WHERE s.evolution_state <> 'not_found' OR s.evolution_reason = 'deleted' OR EXISTS (
            SELECT 1 FROM pgqr.app_instances o JOIN pgqr.instance_state os ON os.key = o.key
            JOIN pgqr.schedule oq ON oq.key = o.key
            WHERE coalesce(o.url, '') = coalesce(a.url, '') AND os.evolution_state IN ('open', 'connecting', 'close')
              AND oq.state_seen_at >= s.evolution_state_at));
    IF cardinality(due) = 0 THEN
        RETURN;
    END IF;
    IF b.disconnected_value IS NOT NULL THEN
        still := ARRAY(SELECT a.key FROM pgqr.app_rows(due) a WHERE a.status = b.connected_value);
        locked := ARRAY(SELECT pgqr.app_lock_connected(still));
        SELECT coalesce(array_agg(f.key), '{}'), coalesce(array_agg(f.detail), '{}') INTO refused, details
        FROM pgqr.app_write_each(ARRAY(SELECT ROW(k, 'disconnected', NULL, NULL, NULL, NULL)::pgqr.app_write
                                       FROM unnest(locked) k)) f;
        -- held by the app: read and confirmed again soon (pgqr.drops_to_confirm offers it once more)
        UPDATE pgqr.schedule q SET state_checked_at = NULL
         WHERE q.key = ANY(still) AND NOT q.key = ANY(locked);
        due := ARRAY(SELECT k FROM unnest(due) k WHERE NOT (k = ANY(still) AND NOT k = ANY(locked)));
    END IF;
    UPDATE pgqr.instance_state s SET dropped_at = now() WHERE s.key = ANY(due);
    INSERT INTO pgqr.refresh_log (instance_key, instance_name, source, outcome, written, qr_updated, error_class,
                                  owner, detail)
    SELECT s.key, s.name, 'sweep', 'closed', k = ANY(locked) AND NOT k = ANY(refused), false,
           CASE WHEN k = ANY(refused) THEN 'app_refused' END, writer,
           format('dropped: Evolution says %s%s; %s', s.evolution_state,
                  coalesce(' (' || s.evolution_reason || ')', ''),
                  CASE WHEN b.disconnected_value IS NULL THEN 'no disconnected value bound'
                       WHEN k = ANY(refused) THEN 'the app''s table refused it: ' || details[array_position(refused, k)]
                       WHEN k = ANY(locked) THEN format('wrote %L', b.disconnected_value)
                       ELSE 'the row no longer holds the connected value' END)
    FROM unnest(due) k JOIN pgqr.instance_state s ON s.key = k;
    PERFORM pg_notify('pgqr_qr_updated', json_build_object('key', left(k, 200), 'event', 'disconnected')::text)
       FROM unnest(due) k;
    RETURN QUERY SELECT k FROM unnest(due) k;
END
$$;

-- Record what Evolution says of instances: [{"key", "state": open|connecting|close|not_found, "reason",
-- "source": webhook|poll|sweep, "checked": a read of the in-memory state (connectionState, a poll), "expected":
-- the state pgqr held when the read was decided (a sweep's; with "expect": true)}].
--   * The state and its reason are durable, and change only when they change; when they were last seen and
--     last checked live in the (unlogged) schedule row. A webhook repeating what pgqr holds changes nothing at
--     all: it is dropped before any row is locked (no transaction id, no WAL).
--   * A sweep's read applies only while pgqr still holds the state it was decided on: a webhook or a confirming
--     read that came in meanwhile is newer, and wins.
--   * A connected instance (Evolution said open, or the app's row holds the connected value) reported closed or
--     gone becomes a pending drop; open or connecting clears it. Pending drops are settled (pgqr.settle_drops).
--     A deleted instance read as not found keeps its reason (deleted).
--   * Without a status column, a row whose state turns connecting starts waiting (due now, listeners woken) and
--     one whose state leaves connecting stops.
--   * A state change of a known state is news: one refresh_log row.
-- Rows another writer holds are skipped and returned (hand them in again); an unknown key is ignored.
CREATE FUNCTION pgqr.observe(writer text, observations jsonb) RETURNS SETOF text
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    b       pgqr.binding;
    obs     jsonb[];
    keys    text[];
    mine    text[];
    started text[];
BEGIN
    PERFORM pgqr.ensure_schedule();
    SELECT * INTO b FROM pgqr.binding;
    -- one observation per key, the last one given, and only those that can change something
    SELECT coalesce(array_agg(o ORDER BY o->>'key'), '{}'), coalesce(array_agg(o->>'key' ORDER BY o->>'key'), '{}')
      INTO obs, keys
      FROM (SELECT DISTINCT ON (x.o->>'key') x.o FROM jsonb_array_elements(observations) WITH ORDINALITY x(o, n)
            WHERE x.o->>'state' IN ('open', 'connecting', 'close', 'not_found')
            ORDER BY x.o->>'key', x.n DESC) y(o)
      JOIN pgqr.instance_state s ON s.key = o->>'key'
     WHERE NOT (coalesce((o->>'expect')::boolean, false) AND s.evolution_state IS DISTINCT FROM o->>'expected')
       AND (s.evolution_state IS DISTINCT FROM o->>'state'
            OR (o->>'reason' IS NOT NULL AND o->>'reason' IS DISTINCT FROM s.evolution_reason)
            OR coalesce((o->>'checked')::boolean, false) OR o->>'source' = 'sweep'
            OR (o->>'state' IN ('open', 'connecting') AND (s.drop_pending_since IS NOT NULL OR s.dropped_at IS NOT NULL))
            OR (b.status_column IS NULL AND s.waiting IS DISTINCT FROM (o->>'state' = 'connecting')));
    IF cardinality(keys) = 0 THEN
        RETURN;
    END IF;
    mine := ARRAY(SELECT q.key FROM pgqr.schedule q WHERE q.key = ANY(keys) ORDER BY q.key FOR UPDATE OF q SKIP LOCKED);

    WITH o AS (
        SELECT x->>'key' AS key, x->>'state' AS state, x->>'reason' AS reason,
               coalesce(x->>'source', 'sweep') AS source, coalesce((x->>'checked')::boolean, false) AS checked
        FROM unnest(obs) x WHERE x->>'key' = ANY(mine)
    ), n AS (
        SELECT o.key, o.state, o.source, o.checked, s.name, s.evolution_state AS was,
               o.state IS DISTINCT FROM s.evolution_state AS changed,
               coalesce(o.reason, CASE WHEN o.state = 'not_found' AND s.evolution_reason = 'deleted' THEN 'deleted'
                                       WHEN o.state IS NOT DISTINCT FROM s.evolution_state
                                       THEN s.evolution_reason END) AS reason,
               CASE WHEN o.state IN ('open', 'connecting') THEN NULL
                    WHEN s.drop_pending_since IS NOT NULL THEN s.drop_pending_since
                    WHEN s.evolution_state = 'open' OR a.status = b.connected_value THEN now() END AS pending,
               CASE WHEN o.state IN ('open', 'connecting') THEN NULL ELSE s.dropped_at END AS dropped
        FROM o JOIN pgqr.instance_state s ON s.key = o.key
        LEFT JOIN pgqr.app_rows(mine) a ON a.key = o.key
    ), kept AS (
        UPDATE pgqr.instance_state s
           SET evolution_state = n.state,
               evolution_state_at = CASE WHEN n.changed THEN now() ELSE s.evolution_state_at END,
               evolution_reason = n.reason, drop_pending_since = n.pending, dropped_at = n.dropped
          FROM n
         WHERE s.key = n.key
           AND (s.evolution_state, s.evolution_reason, s.drop_pending_since, s.dropped_at)
               IS DISTINCT FROM (n.state, n.reason, n.pending, n.dropped)
        RETURNING 1
    ), seen AS (
        UPDATE pgqr.schedule q
           SET state_seen_at = now(),
               state_checked_at = CASE WHEN n.checked THEN now() WHEN n.changed THEN NULL ELSE q.state_checked_at END
          FROM n
         WHERE q.key = n.key
        RETURNING 1
    )
    INSERT INTO pgqr.refresh_log (instance_key, instance_name, source, outcome, written, qr_updated, owner, detail)
    SELECT n.key, n.name, n.source::pgqr.source, 'event', true, false, writer,
           format('Evolution: %s -> %s%s', n.was, n.state, coalesce(' (' || n.reason || ')', ''))
    FROM n WHERE n.changed AND n.was IS NOT NULL;

    IF b.status_column IS NULL THEN
        SELECT coalesce(array_agg(t.key) FILTER (WHERE t.started), '{}') INTO started
        FROM pgqr.track(ARRAY(
            SELECT ROW(s.key, s.name, coalesce(s.evolution_state = 'connecting', false), false)::pgqr.app_change
            FROM pgqr.instance_state s
            WHERE s.key = ANY(mine) AND s.waiting IS DISTINCT FROM coalesce(s.evolution_state = 'connecting', false))) t;
        IF cardinality(started) > 0 THEN
            PERFORM pg_notify('pgqr_refresh', json_build_object('reason', 'waiting', 'key', left(k, 200))::text)
               FROM unnest(started) k;
        END IF;
    END IF;

    PERFORM pgqr.settle_drops(writer, mine);
    RETURN QUERY SELECT k FROM unnest(keys) k WHERE NOT k = ANY(mine);
END
$$;

-- The write path (0011's record_results, unchanged, under a new name) with Evolution's state observed around it:
-- without a status column, a webhook saying `connecting` first starts the row waiting so its QR is taken; then
-- the results that say something the write path did not record are observed: a webhook about an instance that is
-- not waiting (a connected one that drops), open, close, and every state of a row without a status column. The
-- hot path, a QR of a waiting instance, is not observed twice. A webhook whose observation met another writer's
-- lock is returned busy, to be handed in again.
ALTER FUNCTION pgqr.record_results(text, jsonb) RENAME TO write_results;

-- What results say of Evolution's state, as pgqr.observe takes it (a poll read Evolution's memory: checked).
CREATE FUNCTION pgqr.result_observations(results jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'key', r->>'key', 'state', r->>'evolution_state', 'reason', r->>'evolution_reason',
               'source', r->>'source', 'checked', r->>'source' = 'poll')), '[]')
    FROM jsonb_array_elements(results) r
    WHERE r->>'evolution_state' IS NOT NULL
$$;

-- `observations` are result_observations(results), picked out by the caller: reading them here from the results,
-- QR images and all, cost a poll a sixth more database time.
CREATE FUNCTION pgqr.record_results(writer text, results jsonb, observations jsonb)
RETURNS TABLE (key text, written boolean, claim_held boolean, busy boolean, qr_updated boolean, outcome text,
               reason text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    statusless boolean := coalesce((SELECT b.status_column IS NULL FROM pgqr.binding b), false);
    starting   jsonb;
    seen       jsonb;
    unwritten  text[] := '{}';
    superseded text[] := '{}';
    skipped    text[] := '{}';
    w          record;
BEGIN
    IF statusless THEN
        -- webhooks saying connecting of rows not known to connect yet: they start waiting first
        SELECT coalesce(jsonb_agg(o), '[]') INTO starting FROM jsonb_array_elements(observations) o
        WHERE o->>'state' = 'connecting' AND o->>'source' = 'webhook'
          AND NOT EXISTS (SELECT 1 FROM pgqr.instance_state s
                          WHERE s.key = o->>'key' AND s.evolution_state = 'connecting' AND s.waiting);
        IF jsonb_array_length(starting) > 0 THEN
            skipped := ARRAY(SELECT pgqr.observe(writer, starting));
        END IF;
    END IF;
    FOR w IN SELECT * FROM pgqr.write_results(writer, results) LOOP
        key := w.key; written := w.written; claim_held := w.claim_held; busy := w.busy;
        qr_updated := w.qr_updated; outcome := w.outcome; reason := w.reason;
        RETURN NEXT;
        IF NOT w.written AND NOT w.busy THEN
            unwritten := unwritten || w.key;
        END IF;
        IF NOT w.claim_held THEN
            superseded := superseded || w.key;
        END IF;
    END LOOP;
    -- what the write did not record: open, close and not found; connecting only of a row it did not write (and,
    -- without a status column, not a webhook's, observed above); never a poll whose claim was superseded (the
    -- row's name, server or token changed during the call: its word is about another instance)
    SELECT coalesce(jsonb_agg(o), '[]') INTO seen FROM jsonb_array_elements(observations) o
    WHERE NOT (o->>'source' = 'poll' AND o->>'key' = ANY(superseded))
      AND (o->>'state' <> 'connecting'
           OR (o->>'key' = ANY(unwritten) AND NOT (statusless AND o->>'source' = 'webhook')));
    IF jsonb_array_length(seen) > 0 THEN
        skipped := skipped || ARRAY(SELECT pgqr.observe(writer, seen));
    END IF;
    -- a second row for its key, busy: the writer keeps the last row of a key
    RETURN QUERY SELECT DISTINCT k, false, false, true, false, 'event'::text, 'busy'::text
                 FROM unnest(skipped) k
                 WHERE EXISTS (SELECT 1 FROM jsonb_array_elements(observations) o
                               WHERE o->>'key' = k AND o->>'source' = 'webhook');
END
$$;

-- The same, picking the observations out of the results itself (for a person in psql, or a test).
CREATE FUNCTION pgqr.record_results(writer text, results jsonb)
RETURNS TABLE (key text, written boolean, claim_held boolean, busy boolean, qr_updated boolean, outcome text,
               reason text)
LANGUAGE sql AS $$
    SELECT * FROM pgqr.record_results(writer, results, pgqr.result_observations(results))
$$;

-- The claim (0011's), also saying whether the call must first read connectionState: without a status column a
-- row waits on Evolution's word, which may have turned `close` since, and a connect on a closed instance opens a
-- WhatsApp socket nobody asked for.
DROP FUNCTION pgqr.claim(text, integer, interval, timestamptz);
CREATE FUNCTION pgqr.claim(claim_owner text, max_rows integer, lease interval, due_by timestamptz DEFAULT now())
RETURNS TABLE (key text, name text, token text, url text, phone text, qr_md5 text, claimed_at timestamptz,
               claim_id bigint, guarded boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    keys      text[];
    max_calls integer := pgqr.setting('max_calls_per_minute')::integer;
    guard     boolean := coalesce((SELECT b.status_column IS NULL FROM pgqr.binding b), false);
BEGIN
    PERFORM pgqr.ensure_schedule();
    keys := ARRAY(
        SELECT q.key FROM pgqr.schedule q
        WHERE q.due_at <= due_by AND (q.lease_expires_at IS NULL OR q.lease_expires_at <= now())
        ORDER BY q.due_at
        LIMIT greatest(max_rows, 0)
        FOR UPDATE OF q SKIP LOCKED);
    IF cardinality(keys) = 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH a AS MATERIALIZED (
        SELECT * FROM pgqr.app_rows(keys)
    ), resting AS (
        UPDATE pgqr.schedule q SET due_at = NULL, claim_id = NULL
         WHERE q.key = ANY(keys) AND NOT EXISTS (SELECT 1 FROM a WHERE a.key = q.key AND a.waiting)
        RETURNING q.key
    ), stopped AS (
        UPDATE pgqr.instance_state s SET waiting = false FROM resting r WHERE s.key = r.key AND s.waiting
        RETURNING 1
    ), claimed AS (
        UPDATE pgqr.schedule q
           SET claim_id = nextval('pgqr.claim_numbers'), claimed_at = now(),
               lease_owner = claim_owner, lease_expires_at = now() + lease, due_at = now() + lease,
               last_attempt_at = now(), recent_polls = pgqr.polls_kept(q.recent_polls || now(), max_calls)
          FROM a
         WHERE q.key = a.key AND a.waiting
        RETURNING q.key, a.name, a.token, a.url, a.phone, q.claimed_at, q.claim_id
    )
    SELECT c.key, c.name, c.token, c.url, c.phone, s.qr_md5, c.claimed_at, c.claim_id, guard
    FROM claimed c LEFT JOIN pgqr.instance_state s ON s.key = c.key;
END
$$;

-- What the sidecar's sweep reads: every bound row that is not waiting (a waiting one is polled anyway), with what
-- calling Evolution for it takes and the state pgqr holds.
CREATE FUNCTION pgqr.sweep_rows()
RETURNS TABLE (key text, name text, token text, url text, evolution_state text)
LANGUAGE sql STABLE AS $$
    SELECT a.key, a.name, a.token, a.url, s.evolution_state
    FROM pgqr.app_instances a LEFT JOIN pgqr.instance_state s ON s.key = a.key
    WHERE NOT coalesce(s.waiting, false)
    ORDER BY a.key
$$;

-- One sweep at a time across replicas: whoever holds this lease sweeps (it lapses if that process dies).
CREATE TABLE pgqr.sweep_lease (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    owner      text NOT NULL,
    expires_at timestamptz NOT NULL
);

-- Take or keep the sweep lease for `hold`; true when `claimant` holds it now.
CREATE FUNCTION pgqr.take_sweep(claimant text, hold interval) RETURNS boolean
LANGUAGE sql AS $$
    INSERT INTO pgqr.sweep_lease AS l (owner, expires_at) VALUES (claimant, now() + hold)
    ON CONFLICT (singleton) DO UPDATE SET owner = claimant, expires_at = now() + hold
     WHERE l.owner = claimant OR l.expires_at <= now()
    RETURNING true
$$;

-- Pending drops whose state has held long enough and that no connectionState read has confirmed since: the
-- sidecar reads each once (pgqr.observe with checked) and the drop settles.
CREATE FUNCTION pgqr.drops_to_confirm(max_rows integer DEFAULT 100)
RETURNS TABLE (key text, name text, token text, url text, evolution_state text)
LANGUAGE sql STABLE AS $$
    SELECT a.key, a.name, a.token, a.url, s.evolution_state
    FROM pgqr.app_rows(ARRAY(
        SELECT s.key FROM pgqr.instance_state s JOIN pgqr.schedule q ON q.key = s.key
        CROSS JOIN LATERAL (SELECT s.evolution_state_at
                                   + CASE WHEN s.evolution_reason IN ('logged_out', 'deleted') THEN '0'::interval
                                          ELSE pgqr.seconds('disconnect_after_seconds') END AS held_at) h
        WHERE s.drop_pending_since IS NOT NULL AND s.dropped_at IS NULL
          AND h.held_at <= now() AND (q.state_checked_at IS NULL OR q.state_checked_at < h.held_at)
        ORDER BY s.drop_pending_since
        LIMIT max_rows)) a
    JOIN pgqr.instance_state s ON s.key = a.key
$$;

-- instance_health (0010's columns, in order) and Evolution's word on each row: why, since when, when last seen,
-- and whether a connected instance dropped.
CREATE OR REPLACE VIEW pgqr.instance_health AS
SELECT a.key                                  AS instance_key,
       a.name                                 AS instance_name,
       a.status,
       coalesce(a.waiting, false)             AS waiting,
       (a.qr IS NOT NULL OR s.qr IS NOT NULL OR s.qr_md5 IS NOT NULL) AS has_qr,
       s.qr_seen_at                           AS last_qr_update,
       now() - s.qr_seen_at                   AS qr_age,
       greatest(s.qr_expires_at, q.qr_alive_at) AS qr_expires_at,
       coalesce(a.waiting AND greatest(s.qr_expires_at, q.qr_alive_at) > now(), false) AS qr_valid,
       s.qr_source,
       s.evolution_state,
       q.last_attempt_at,
       q.last_success_at,
       s.last_outcome,
       s.last_error_class,
       q.last_http_status,
       coalesce(q.consecutive_failures, 0)    AS consecutive_failures,
       q.due_at                               AS next_attempt_at,
       q.lease_owner,
       q.lease_expires_at,
       s.connecting_since,
       s.evolution_reason,
       s.evolution_state_at                   AS evolution_state_since,
       greatest(q.state_seen_at, s.evolution_state_at) AS evolution_confirmed_at,
       s.dropped_at
FROM pgqr.app_instances a
LEFT JOIN pgqr.instance_state s ON s.key = a.key
LEFT JOIN pgqr.schedule q ON q.key = a.key;

CREATE VIEW pgqr.alert_connections_dropped AS
SELECT 'connections_dropped'::text AS rule,
       x.n > 0 AS firing,
       x.n AS count,
       CASE WHEN x.n > 0
            THEN format('%s connected instance(s) dropped in the last %s and not connected again: %s%s',
                        x.n, pgqr.human_interval(x.threshold), left(x.names, 600),
                        CASE WHEN x.n > 10 THEN ', ...' ELSE '' END)
            ELSE format('no connected instance dropped in the last %s', pgqr.human_interval(x.threshold)) END
FROM (SELECT t.threshold, count(d.name)::integer AS n,
             string_agg(d.name, ', ' ORDER BY d.rn) FILTER (WHERE d.rn <= 10) AS names
      FROM (SELECT pgqr.setting('alert_dropped_window')::interval AS threshold) t
      LEFT JOIN LATERAL (SELECT s.name, row_number() OVER (ORDER BY s.dropped_at DESC, s.name) AS rn
                         FROM pgqr.instance_state s WHERE s.dropped_at >= now() - t.threshold) d ON true
      GROUP BY t.threshold) x;

CREATE VIEW pgqr.alert_evolution_server_missing AS
SELECT 'evolution_server_missing'::text AS rule,
       x.n > 0 AS firing,
       x.n AS count,
       CASE WHEN x.n > 0
            THEN format('every instance bound to %s is unknown to it (%s): a wrong base URL or another Evolution, '
                        'not deleted instances', x.servers, x.rows)
            ELSE 'every Evolution server knows at least one of its bound instances' END
FROM (SELECT count(*)::integer AS n, left(string_agg(m.server, ', ' ORDER BY m.server), 600) AS servers,
             sum(m.instances) AS rows
      FROM pgqr.missing_servers() m) x;

CREATE OR REPLACE FUNCTION pgqr.alert_rules()
RETURNS TABLE (rule text, firing boolean, count integer, detail text)
LANGUAGE sql STABLE AS $$
    SELECT * FROM pgqr.alert_stale_qr
    UNION ALL SELECT * FROM pgqr.alert_no_listener
    UNION ALL SELECT * FROM pgqr.alert_ticks_not_firing
    UNION ALL SELECT * FROM pgqr.alert_evolution_failures
    UNION ALL SELECT * FROM pgqr.alert_connections_dropped
    UNION ALL SELECT * FROM pgqr.alert_evolution_server_missing
$$;

-- An existing binding gets the new guards, lock and trigger now.
SELECT pgqr.install_binding(b) FROM pgqr.binding b WHERE to_regclass(b.table_name) IS NOT NULL;
