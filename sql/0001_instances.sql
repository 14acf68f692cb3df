-- pgqr 0001: the application's instances table.
--
-- Apps that adopt pgqr usually have this table already, and their teams run monitoring queries against it.
-- So: create it when it is missing, otherwise only add what is missing, never rewrite or drop anything.

CREATE TABLE IF NOT EXISTS public.evolution_instances (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id         uuid,
    instance_name   text NOT NULL UNIQUE,
    instance_token  text,
    instance_status text NOT NULL DEFAULT 'connecting',
    qr_code         text,
    last_qr_update  timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Columns an adopted table may lack. ADD COLUMN IF NOT EXISTS keeps every existing column and row as it is.
ALTER TABLE public.evolution_instances
    ADD COLUMN IF NOT EXISTS user_id         uuid,
    ADD COLUMN IF NOT EXISTS instance_token  text,
    ADD COLUMN IF NOT EXISTS instance_status text NOT NULL DEFAULT 'connecting',
    ADD COLUMN IF NOT EXISTS qr_code         text,
    ADD COLUMN IF NOT EXISTS last_qr_update  timestamptz,
    -- the 8-character phone pairing code, when Evolution sends one with the QR
    ADD COLUMN IF NOT EXISTS pairing_code    text,
    -- instances can live on different Evolution servers; NULL means EVOLUTION_API_URL
    ADD COLUMN IF NOT EXISTS evolution_url   text;

-- pgqr's bookkeeping references instances by name, which needs a unique index. An adopted table may have
-- declared uniqueness under another name; only add one when no unique index on (instance_name) exists.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1
        FROM pg_index x
        JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
        WHERE x.indrelid = 'public.evolution_instances'::regclass
          AND x.indisunique AND x.indnkeyatts = 1 AND x.indpred IS NULL
          AND a.attname = 'instance_name'
    ) THEN
        CREATE UNIQUE INDEX evolution_instances_instance_name_key
            ON public.evolution_instances (instance_name);
    END IF;
END
$$;

CREATE INDEX IF NOT EXISTS evolution_instances_connecting_idx
    ON public.evolution_instances (instance_name) WHERE instance_status = 'connecting';
