-- pgqr 0003: the binding. pgqr reads and writes the app's instances table only through one declared mapping
-- (table, key, name, status and its values, optional token, URL, QR, phone... columns), stored here and
-- turned by pgqr.bind() into a view, three small functions and one trigger. Nothing else in pgqr names the
-- app's table or columns. On the app's table pgqr adds no column, no index and no default: what the app
-- lacks (the QR's timestamps, its expiry estimate, the QR itself when there is no column for it) lives in
-- pgqr.instance_state.

-- Names come from the app as it wrote them, of any length: a btree entry holds at most ~2.7 kB, so one long
-- name failed the trigger's bookkeeping for its row and every tick's sync_instances() for all rows. A hash
-- index serves find_instances()' equality lookups and has no such limit.
DROP INDEX pgqr.instance_state_name_idx;
CREATE INDEX instance_state_name_idx ON pgqr.instance_state USING hash (name);

CREATE TABLE pgqr.binding (
    singleton         boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    table_name        text NOT NULL,        -- schema-qualified, quoted as needed
    key_column        text NOT NULL,
    key_type          text NOT NULL,
    name_column       text NOT NULL,
    status_column     text NOT NULL,
    status_type       text NOT NULL,
    waiting_values    text[] NOT NULL,      -- "needs a QR"; pgqr never moves a row into one of these
    connected_value   text NOT NULL,        -- written once Evolution says open
    gave_up_value     text,                 -- written when Evolution gives up (QR limit, logout, delete); NULL: never
    token_column      text,
    url_column        text,
    qr_column         text,
    qr_at_column      text,
    qr_expires_column text,
    pairing_column    text,
    phone_column      text,
    bound_at          timestamptz NOT NULL DEFAULT now()
);

-- The app's rows as pgqr sees them. bind() replaces these placeholders (same columns, same types).
CREATE VIEW pgqr.app_instances AS
SELECT NULL::text AS key, NULL::text AS name, NULL::text AS status, NULL::text AS token, NULL::text AS url,
       NULL::text AS qr, NULL::timestamptz AS qr_at, NULL::text AS pairing_code, NULL::text AS phone,
       NULL::boolean AS waiting
WHERE false;

-- One write to the app's table: kind 'qr' (a new QR), 'connected' or 'gave_up'.
CREATE TYPE pgqr.app_write AS (key text, kind text, qr text, pairing_code text, qr_at timestamptz,
                               qr_expires_at timestamptz);

CREATE FUNCTION pgqr.app_rows(keys text[]) RETURNS SETOF pgqr.app_instances
LANGUAGE sql STABLE AS $$ SELECT * FROM pgqr.app_instances WHERE key = ANY(keys) $$;

CREATE FUNCTION pgqr.app_lock(keys text[]) RETURNS SETOF text
LANGUAGE sql AS $$ SELECT NULL::text WHERE false $$;

CREATE FUNCTION pgqr.app_write(writes pgqr.app_write[]) RETURNS SETOF text
LANGUAGE sql AS $$ SELECT NULL::text WHERE false $$;

-- Schema-qualified and quoted, whatever the search_path of whoever runs the generated SQL.
CREATE FUNCTION pgqr.qualified(tbl regclass) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = tbl
$$;

-- The column's type as format_type() names it, or NULL when the table has no such column.
CREATE FUNCTION pgqr.column_type(tbl regclass, col text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
    WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped
$$;

-- 'S' string, 'E' enum, 'D' date/time, ... (pg_type.typcategory of the column's type).
CREATE FUNCTION pgqr.column_category(tbl regclass, col text) RETURNS "char"
LANGUAGE sql STABLE AS $$
    SELECT t.typcategory FROM pg_attribute a
    JOIN pg_type t ON t.oid = CASE WHEN (SELECT typtype FROM pg_type WHERE oid = a.atttypid) = 'd'
                                   THEN (SELECT typbasetype FROM pg_type WHERE oid = a.atttypid)
                                   ELSE a.atttypid END
    WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped
$$;

-- Whether the table's CHECK constraints and the column's type accept `value` in `col`: tried on an empty
-- copy of the table's shape (LIKE ... INCLUDING CONSTRAINTS, NOT NULLs dropped), never on the table itself.
CREATE FUNCTION pgqr.value_refused(tbl regclass, col text, value text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    c record;
BEGIN
    EXECUTE format('CREATE TEMP TABLE pgqr_binding_probe (LIKE %s INCLUDING CONSTRAINTS) ON COMMIT DROP', tbl);
    FOR c IN SELECT a.attname FROM pg_attribute a
             WHERE a.attrelid = 'pg_temp.pgqr_binding_probe'::regclass AND a.attnum > 0 AND a.attnotnull LOOP
        EXECUTE format('ALTER TABLE pg_temp.pgqr_binding_probe ALTER COLUMN %I DROP NOT NULL', c.attname);
    END LOOP;
    BEGIN
        EXECUTE format('INSERT INTO pg_temp.pgqr_binding_probe (%I) VALUES (%L)', col, value);
    EXCEPTION WHEN OTHERS THEN
        EXECUTE 'DROP TABLE pg_temp.pgqr_binding_probe';
        -- name the app's table, not the probe
        RETURN replace(SQLERRM, '"pgqr_binding_probe"', tbl::text);
    END;
    EXECUTE 'DROP TABLE pg_temp.pgqr_binding_probe';
    RETURN NULL;
END
$$;

-- Every problem with a binding, one line each (empty when it can be bound).
CREATE FUNCTION pgqr.binding_problems(b pgqr.binding) RETURNS text[]
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
        -- with or without a precision: Prisma's DateTime is timestamp(3)
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
    IF cardinality(b.waiting_values) = 0 THEN
        problems := problems || 'give at least one waiting status value'::text;
    END IF;
    IF b.connected_value = ANY(b.waiting_values) OR b.gave_up_value = ANY(b.waiting_values) THEN
        problems := problems || 'the connected and gave-up values must not be waiting values'::text;
    END IF;
    -- probed whenever the status column is there, so one run lists this problem beside any other
    IF pgqr.column_category(tbl, b.status_column) IN ('S', 'E') THEN
        FOREACH v IN ARRAY array_remove(b.waiting_values || b.connected_value || b.gave_up_value, NULL) LOOP
            refusal := pgqr.value_refused(tbl, b.status_column, v);
            IF refusal IS NOT NULL THEN
                problems := problems || format('column %I cannot hold %L: %s', b.status_column, v, refusal);
            END IF;
        END LOOP;
    END IF;
    RETURN problems;
END
$$;

-- The SQL text of one bound column, or a typed NULL.
CREATE FUNCTION pgqr.bound(col text, cast_to text DEFAULT 'text') RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN col IS NULL THEN 'NULL::' || cast_to ELSE format('t.%I::%s', col, cast_to) END
$$;

-- (Re)create the view, the functions and the trigger for binding `b`.
CREATE FUNCTION pgqr.install_binding(b pgqr.binding) RETURNS void
LANGUAGE plpgsql AS $gen$
DECLARE
    tbl      text := pgqr.qualified(to_regclass(b.table_name));
    waiting  text := format('%s = ANY(%L::text[])', pgqr.bound(b.status_column), b.waiting_values);
    cols     text;
    key_eq   text := format('t.%I = ANY(keys::%s[])', b.key_column, b.key_type);
    sets     text;
    body     text := '';
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

    -- The writes, one UPDATE per kind, each guarded by the app's own status: a row the app has moved out of
    -- waiting never gets a QR or a status from pgqr. The status column is only SET where it changes, so the
    -- app's own UPDATE OF triggers fire only then.
    sets := concat_ws(', ',
        CASE WHEN b.qr_column IS NOT NULL THEN format('%I = coalesce(w.qr, t.%I)', b.qr_column, b.qr_column) END,
        CASE WHEN b.qr_at_column IS NOT NULL THEN format('%I = w.qr_at', b.qr_at_column) END,
        CASE WHEN b.qr_expires_column IS NOT NULL THEN format('%I = w.qr_expires_at', b.qr_expires_column) END,
        CASE WHEN b.pairing_column IS NOT NULL THEN format('%I = w.pairing_code', b.pairing_column) END);
    IF sets <> '' THEN
        body := body || format('UPDATE %s t SET %s FROM unnest(writes) w WHERE w.kind = ''qr'' AND t.%I = w.key::%s AND %s; ',
                               tbl, sets, b.key_column, b.key_type, waiting);
    END IF;
    sets := concat_ws(', ',
        format('%I = %L::%s', b.status_column, b.connected_value, b.status_type),
        CASE WHEN b.qr_column IS NOT NULL THEN format('%I = NULL', b.qr_column) END,
        CASE WHEN b.pairing_column IS NOT NULL THEN format('%I = NULL', b.pairing_column) END);
    body := body || format('UPDATE %s t SET %s FROM unnest(writes) w WHERE w.kind = ''connected'' AND t.%I = w.key::%s AND %s; ',
                           tbl, sets, b.key_column, b.key_type, waiting);
    IF b.gave_up_value IS NOT NULL THEN
        body := body || format('UPDATE %s t SET %I = %L::%s FROM unnest(writes) w WHERE w.kind = ''gave_up'' AND t.%I = w.key::%s AND %s; ',
                               tbl, b.status_column, b.gave_up_value, b.status_type, b.key_column, b.key_type, waiting);
    END IF;
    EXECUTE format('CREATE OR REPLACE FUNCTION pgqr.app_write(writes pgqr.app_write[]) RETURNS SETOF text '
                   'LANGUAGE plpgsql AS %L',
                   'BEGIN ' || body || 'RETURN QUERY SELECT w.key FROM unnest(writes) w; END');

    -- The trigger keeps pgqr.instance_state in step with the app's rows and wakes the listeners when a row
    -- starts waiting. It runs as pgqr's owner with a pinned search_path (an app role such as Supabase's
    -- `authenticated` has no rights on schema pgqr) and never aborts the app's statement: an error becomes a
    -- WARNING and a row in pgqr.trigger_errors.
    EXECUTE format($trg$
        CREATE OR REPLACE FUNCTION pgqr.on_app_change() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgqr AS $body$
        DECLARE
            k text;
            w boolean;
            was boolean := false;
        BEGIN
            BEGIN
                IF TG_OP IN ('UPDATE', 'DELETE') THEN
                    was := OLD.%2$I::text = ANY(%3$L::text[]);
                    IF TG_OP = 'DELETE' OR OLD.%1$I::text IS DISTINCT FROM NEW.%1$I::text THEN
                        DELETE FROM pgqr.instance_state WHERE key = OLD.%1$I::text;
                        was := false;
                    END IF;
                    IF TG_OP = 'DELETE' THEN
                        RETURN NULL;
                    END IF;
                END IF;
                k := NEW.%1$I::text;
                w := coalesce(NEW.%2$I::text = ANY(%3$L::text[]), false);
                INSERT INTO pgqr.instance_state AS s (key, name, waiting, due_at)
                VALUES (k, coalesce(NEW.%4$I::text, ''), w, CASE WHEN w THEN now() END)
                ON CONFLICT (key) DO UPDATE
                   SET name = EXCLUDED.name,
                       waiting = EXCLUDED.waiting,
                       due_at = CASE WHEN NOT EXCLUDED.waiting THEN NULL
                                     WHEN NOT s.waiting THEN now() ELSE s.due_at END,
                       connecting_since = CASE WHEN EXCLUDED.waiting AND NOT s.waiting THEN now()
                                               ELSE s.connecting_since END,
                       consecutive_failures = CASE WHEN EXCLUDED.waiting AND NOT s.waiting THEN 0
                                                   ELSE s.consecutive_failures END,
                       repeats = CASE WHEN EXCLUDED.waiting AND NOT s.waiting THEN 0 ELSE s.repeats END,
                       -- the app may have cleared its QR: the next image seen is news again
                       qr_md5 = CASE WHEN EXCLUDED.waiting AND NOT s.waiting THEN NULL ELSE s.qr_md5 END
                 WHERE s.name IS DISTINCT FROM EXCLUDED.name OR s.waiting IS DISTINCT FROM EXCLUDED.waiting;
                IF w AND NOT was THEN
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
        $body$$trg$, b.key_column, b.status_column, b.waiting_values, b.name_column);
    EXECUTE format('DROP TRIGGER IF EXISTS pgqr_instance_change ON %s', tbl);
    -- the key may also be the name (a table keyed by instance name): UPDATE OF refuses a column named twice
    EXECUTE format('CREATE TRIGGER pgqr_instance_change AFTER INSERT OR DELETE OR UPDATE OF %s ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION pgqr.on_app_change()',
                   (SELECT string_agg(DISTINCT quote_ident(c), ', ')
                    FROM unnest(ARRAY[b.key_column, b.name_column, b.status_column]) c), tbl);
END
$gen$;

-- Bind pgqr to the app's table (or re-bind it): validates everything first and refuses with one line per
-- problem; moves pgqr's trigger; keeps pgqr's history (refresh_log) and, on the same table, every instance's
-- state. Returns the binding. `key_column` defaults to the table's single-column primary key.
CREATE FUNCTION pgqr.bind(
    table_name text, name_column text, status_column text,
    waiting_values text[] DEFAULT '{connecting}', connected_value text DEFAULT 'connected',
    gave_up_value text DEFAULT NULL, key_column text DEFAULT NULL,
    token_column text DEFAULT NULL, url_column text DEFAULT NULL, qr_column text DEFAULT NULL,
    qr_at_column text DEFAULT NULL, qr_expires_column text DEFAULT NULL, pairing_column text DEFAULT NULL,
    phone_column text DEFAULT NULL)
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
             phone_column, now())::pgqr.binding;
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
        DELETE FROM pgqr.instance_state;   -- keyed by another table's keys
    END IF;
    DELETE FROM pgqr.binding;
    INSERT INTO pgqr.binding VALUES (b.*);
    PERFORM pgqr.install_binding(b);
    PERFORM pgqr.sync_instances();
    RETURN b;
END
$$;

-- The seed's table, for a fresh install with the default binding (an existing table is never changed).
CREATE FUNCTION pgqr.create_default_table() RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF to_regclass('public.evolution_instances') IS NOT NULL THEN
        RETURN false;
    END IF;
    CREATE TABLE public.evolution_instances (
        id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        user_id         uuid,
        instance_name   text NOT NULL UNIQUE,
        instance_token  text,
        instance_status text NOT NULL DEFAULT 'connecting',
        qr_code         text,
        last_qr_update  timestamptz,
        pairing_code    text,
        evolution_url   text,            -- NULL: EVOLUTION_API_URL
        created_at      timestamptz NOT NULL DEFAULT now()
    );
    RETURN true;
END
$$;

-- Bring pgqr.instance_state in step with the app's rows: rows written with triggers off (a bulk load,
-- session_replication_role = replica), rows that existed before binding. Run by every tick.
CREATE FUNCTION pgqr.sync_instances() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
    changed integer := 0;
BEGIN
    INSERT INTO pgqr.instance_state (key, name, waiting, due_at)
    SELECT a.key, coalesce(a.name, ''), coalesce(a.waiting, false), CASE WHEN a.waiting THEN now() END
    FROM pgqr.app_instances a
    WHERE NOT EXISTS (SELECT 1 FROM pgqr.instance_state s WHERE s.key = a.key)
    ON CONFLICT (key) DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
    UPDATE pgqr.instance_state s
       SET name = coalesce(a.name, ''), waiting = coalesce(a.waiting, false),
           due_at = CASE WHEN NOT coalesce(a.waiting, false) THEN NULL WHEN NOT s.waiting THEN now() ELSE s.due_at END,
           connecting_since = CASE WHEN a.waiting AND NOT s.waiting THEN now() ELSE s.connecting_since END,
           qr_md5 = CASE WHEN a.waiting AND NOT s.waiting THEN NULL ELSE s.qr_md5 END
      FROM pgqr.app_instances a
     WHERE a.key = s.key
       AND (s.name IS DISTINCT FROM coalesce(a.name, '') OR s.waiting IS DISTINCT FROM coalesce(a.waiting, false));
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
    DELETE FROM pgqr.instance_state s WHERE NOT EXISTS (SELECT 1 FROM pgqr.app_instances a WHERE a.key = s.key);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN changed + n;
END
$$;
