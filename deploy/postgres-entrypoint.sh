#!/bin/sh
# First start: initdb into $PGDATA with POSTGRES_PASSWORD, create $POSTGRES_DB, configure pg_cron.
# Every start: exec postgres in the foreground (it gets the stop signal directly).
# Settings (environment): POSTGRES_PASSWORD (required on the first start), POSTGRES_DB (default app),
# PGPORT (default 5432), POSTGRES_LISTEN (listen_addresses, default '*').
set -eu
: "${PGDATA:=/var/lib/postgresql/data}" "${POSTGRES_DB:=app}" "${PGPORT:=5432}" "${POSTGRES_LISTEN:=*}"
export PGDATA PGPORT

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "postgres-entrypoint: set POSTGRES_PASSWORD for the first start (it becomes postgres's password)" >&2
        exit 2
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb -D "$PGDATA" -U postgres --pwfile="$pwfile" --auth-local=peer --auth-host=scram-sha-256 \
        -E UTF8 --locale=C.UTF-8 --no-instructions >/dev/null
    rm -f "$pwfile"
    # before pg_cron is preloaded: single-user mode starts no background workers
    echo "CREATE DATABASE \"$POSTGRES_DB\"" | postgres --single -D "$PGDATA" -j postgres >/dev/null
    cat >> "$PGDATA/postgresql.conf" <<CONF

# pgqr: pg_cron in the application database
shared_preload_libraries = 'pg_cron'
cron.database_name = '$POSTGRES_DB'
CONF
    # pg_cron runs each job over libpq to localhost (cron.host) with no password: trust the container's own
    # loopback (private to the container in its own network namespace), password everything else.
    cat > "$PGDATA/pg_hba.conf" <<HBA
local all all               peer
host  all all 127.0.0.1/32  trust
host  all all ::1/128       trust
host  all all all           scram-sha-256
HBA
    echo "postgres-entrypoint: initialised $PGDATA with database $POSTGRES_DB (pg_cron preloaded)"
fi

exec postgres -D "$PGDATA" -c listen_addresses="$POSTGRES_LISTEN" -c port="$PGPORT"
