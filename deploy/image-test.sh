#!/usr/bin/env bash
# Build the pgqr image and the PostgreSQL + pg_cron image (deploy/postgres.Containerfile), start a throwaway
# PostgreSQL from the latter, and check the pgqr image end to end. One PASS/FAIL line per check; exit 1 on any FAIL.
#
#   deploy/image-test.sh            (or: make image-test)
#
# Engine: docker when a docker engine answers (`docker info`), else podman. Podman builds from local base images
# only: where python:3.11-slim and debian:bookworm-slim are missing, CONTAINER_BASE names a script (run as root)
# that sets podman up and builds local stand-ins for them; unset, the images are pulled, and where no registry
# answers that is one line and exit 2.
# Every container runs with --network host on free loopback ports, and is removed on exit.
# Settings: ENGINE=docker|podman, IMAGE (default localhost/pgqr:dev), PG_IMAGE (default localhost/pgqr-postgres:15).
set -uo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/pgqr:dev}
PG_IMAGE=${PG_IMAGE:-localhost/pgqr-postgres:15}
STOP_GRACE=15            # seconds `stop` waits before SIGKILL; pgqr's own drain budget is 10 s
DEADLINE=60              # seconds for anything we wait on (server up, healthy, ready, QR written)

if [ -z "${ENGINE:-}" ] && [ -n "${CONTAINER_BASE:-}" ] && ! docker info >/dev/null 2>&1; then
    [ -f "$CONTAINER_BASE" ] || { echo "image-test: CONTAINER_BASE=$CONTAINER_BASE is not a file" >&2; exit 2; }
    log=${TMPDIR:-/tmp}/pgqr-container-base.log
    bash "$CONTAINER_BASE" >"$log" 2>&1 || { echo "image-test: $CONTAINER_BASE failed (its output: $log)" >&2; exit 2; }
fi
if [ -z "${ENGINE:-}" ]; then
    if docker info >/dev/null 2>&1; then ENGINE=docker
    elif command -v podman >/dev/null; then ENGINE=podman
    else echo "image-test: neither a docker engine (docker info) nor podman is available" >&2; exit 2
    fi
fi
for tool in curl python3; do
    command -v $tool >/dev/null || { echo "image-test: needs $tool on the host" >&2; exit 2; }
done
if [ "$ENGINE" = podman ]; then
    bases="python:3.11-slim debian:bookworm-slim"
    have_bases() { for b in $bases; do podman image exists "$b" || return 1; done; }
    if ! have_bases; then
        for b in $bases; do
            timeout 60 podman pull -q "$b" >/dev/null 2>&1 || {
                echo "image-test: base image $b is not local and no registry answers: set CONTAINER_BASE to the" \
                     "script that builds local stand-ins (run as root)" >&2; exit 2; }
        done
    fi
fi

# --- bookkeeping -------------------------------------------------------------------------------------------------
failures=0
pass() { printf 'PASS  %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; failures=$((failures + 1)); }
info() { printf '....  %s\n' "$*"; }
now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
secret() { python3 -c 'import secrets; print(secrets.token_hex(16))'; }

tag="pgqr-image-test-$$"
DB="$tag-db"; RUN="$tag-run"; MIGRATE="$tag-migrate"
work=$(mktemp -d)
cleanup() {
    # -v: the PostgreSQL image declares a VOLUME; drop the anonymous volume with its container
    # one at a time: podman gives up on the whole list when one name does not exist
    for c in "$RUN" "$MIGRATE" "$DB"; do $ENGINE rm -f -v "$c" >/dev/null 2>&1; done
    [ -n "${KEEP_LOGS:-}" ] && cp "$work"/*.log "$KEEP_LOGS"/ 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# podman without systemd cannot schedule health timers and says so on stderr; keep that noise out of the report
quiet() { "$@" 2>"$work/stderr"; local rc=$?; grep -v 'systemd' "$work/stderr" >&2; return $rc; }

# Secrets for this run only; each must stay out of the logs.
PG_PASSWORD=$(secret); WEBHOOK_SECRET=$(secret); API_KEY=$(secret); INSTANCE_TOKEN=tok
PG_PORT=$(free_port); HTTP_PORT=$(free_port)
DATABASE_URL="postgresql://postgres:$PG_PASSWORD@127.0.0.1:$PG_PORT/app"

psql_db() { $ENGINE exec "$DB" psql -X -q -At -v ON_ERROR_STOP=1 -d app -c "$1"; }

# --- build -------------------------------------------------------------------------------------------------------
if [ "$ENGINE" = podman ]; then
    # docker format keeps HEALTHCHECK (podman's default OCI format drops it); base images must already be local
    build_flags=(--format docker --pull=never --network host --force-rm)
else
    build_flags=(--network host)
fi
t0=$(now)
if $ENGINE build -q "${build_flags[@]}" -t "$IMAGE" . >"$work/build.log" 2>&1; then
    pass "build $IMAGE with $ENGINE ($(elapsed "$t0") s)"
else
    fail "build $IMAGE with $ENGINE"; tail -30 "$work/build.log"; exit 1
fi
t0=$(now)
if $ENGINE build -q "${build_flags[@]}" -f deploy/postgres.Containerfile -t "$PG_IMAGE" deploy >"$work/build-pg.log" 2>&1
then
    pass "build $PG_IMAGE (PostgreSQL 15 + pg_cron) ($(elapsed "$t0") s)"
else
    fail "build $PG_IMAGE"; tail -30 "$work/build-pg.log"; exit 1
fi

# --- the image's metadata ----------------------------------------------------------------------------------------
healthcheck=$($ENGINE image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE" 2>/dev/null)
if [[ "$healthcheck" == *healthz* ]]; then
    pass "image has a HEALTHCHECK on /healthz"
else
    fail "image has no HEALTHCHECK (got: ${healthcheck:-nothing}); podman needs --format docker"
fi
user=$($ENGINE image inspect --format '{{.Config.User}}' "$IMAGE")
stopsignal=$($ENGINE image inspect --format '{{.Config.StopSignal}}' "$IMAGE")
if [ -n "$user" ] && [ "${user%%:*}" != 0 ] && [ "${user%%:*}" != root ]; then
    pass "image runs as user $user"
else
    fail "image runs as root (User='$user')"
fi
case "$stopsignal" in SIGTERM|15|TERM) pass "image stop signal is SIGTERM" ;;
                      *) fail "image stop signal is '$stopsignal', not SIGTERM" ;; esac

# The simulator's segno is becoming the optional extra `sim`, which the image does not install: the service's
# commands must start without it. A warning, not a failure, while pyproject.toml still installs segno anyway.
if quiet $ENGINE run --rm --network host --entrypoint python "$IMAGE" -c \
        "import sys; sys.modules['segno'] = None; from pgqr.cli import build_parser; build_parser()" \
        >"$work/nosegno.log" 2>&1; then
    pass "pgqr's command line starts without segno (the simulator extra)"
else
    printf 'WARN  %s\n      %s\n' "pgqr's command line needs segno: $(grep -v '^ ' "$work/nosegno.log" | tail -1)" \
        "(pgqr/cli.py imports pgqr.simulator at start; once segno is the 'sim' extra the image cannot run)"
fi

# --- PostgreSQL with pg_cron -------------------------------------------------------------------------------------
# Host networking: bind to loopback only (the image trusts loopback connections, which pg_cron's jobs use).
quiet $ENGINE run -d --name "$DB" --network host -e POSTGRES_PASSWORD="$PG_PASSWORD" -e PGPORT="$PG_PORT" \
    -e POSTGRES_LISTEN=127.0.0.1 "$PG_IMAGE" >/dev/null || { fail "start PostgreSQL"; exit 1; }
t0=$(now); up=""
while [ "$(elapsed "$t0" | cut -d. -f1)" -lt "$DEADLINE" ]; do
    if $ENGINE exec "$DB" pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -d app 2>/dev/null; then up=1; break; fi
    sleep 0.5
done
if [ -n "$up" ]; then
    pass "PostgreSQL with pg_cron up on 127.0.0.1:$PG_PORT ($(elapsed "$t0") s; $(psql_db 'SHOW cron.database_name' | sed 's/^/cron.database_name=/'))"
else
    fail "PostgreSQL did not accept connections within $DEADLINE s"; $ENGINE logs "$DB" 2>&1 | tail -20; exit 1
fi

# --- migrate -----------------------------------------------------------------------------------------------------
if quiet $ENGINE run --rm --name "$MIGRATE" --network host -e DATABASE_URL="$DATABASE_URL" "$IMAGE" migrate \
        >"$work/migrate.log" 2>&1; then
    pass "pgqr migrate from the image ($(grep -c . "$work/migrate.log") lines of output)"
else
    fail "pgqr migrate from the image"; cat "$work/migrate.log"
fi
if quiet $ENGINE run --rm --name "$MIGRATE" --network host -e DATABASE_URL="$DATABASE_URL" "$IMAGE" migrate --verify \
        >"$work/verify.log" 2>&1; then
    pass "pgqr migrate --verify from the image: $(tail -1 "$work/verify.log")"
else
    fail "pgqr migrate --verify from the image"; cat "$work/verify.log"
fi
jobs=$(psql_db "SELECT string_agg(jobname || ' ' || schedule, ', ' ORDER BY jobname) FROM cron.job" 2>&1)
if [[ "$jobs" == *pgqr-tick* ]]; then pass "pg_cron jobs scheduled: $jobs"; else fail "no pgqr-tick job in cron.job ($jobs)"; fi

# --- run: healthy and ready --------------------------------------------------------------------------------------
run_flags=(-d --name "$RUN" --network host
    -e DATABASE_URL="$DATABASE_URL"
    -e EVOLUTION_API_URL=http://127.0.0.1:9      # nothing listens there: the poller's calls fail, which is fine
    -e EVOLUTION_API_KEY="$API_KEY"
    -e PGQR_WEBHOOK_SECRET="$WEBHOOK_SECRET"
    -e PGQR_HTTP_PORT="$HTTP_PORT")
[ "$ENGINE" = docker ] && run_flags+=(--health-interval 2s)   # docker runs HEALTHCHECK itself; don't wait 30 s
quiet $ENGINE run "${run_flags[@]}" "$IMAGE" >/dev/null || { fail "start pgqr run"; exit 1; }

wait_http() {  # wait_http PATH -> 0 once it answers 200 within the deadline
    local t0; t0=$(now)
    while [ "$(elapsed "$t0" | cut -d. -f1)" -lt "$DEADLINE" ]; do
        [ "$(curl -s -o "$work/body" -w '%{http_code}' "http://127.0.0.1:$HTTP_PORT$1")" = 200 ] && return 0
        [ "$($ENGINE inspect --format '{{.State.Running}}' "$RUN" 2>/dev/null)" = true ] || return 1
        sleep 0.5
    done
    return 1
}
t0=$(now)
if wait_http /healthz; then pass "pgqr run answers /healthz 200 ($(elapsed "$t0") s after start)"
else fail "pgqr run: /healthz not 200 within $DEADLINE s"; $ENGINE logs "$RUN" 2>&1 | tail -20; fi
if wait_http /readyz; then pass "pgqr run answers /readyz 200 ($(elapsed "$t0") s after start): $(cat "$work/body")"
else fail "pgqr run: /readyz not 200 within $DEADLINE s: $(cat "$work/body" 2>/dev/null)"; fi

# the image's own HEALTHCHECK command, run inside the container
if [ "$ENGINE" = podman ]; then
    if quiet podman healthcheck run "$RUN" >/dev/null; then pass "the image's HEALTHCHECK passes (podman healthcheck run)"
    else fail "the image's HEALTHCHECK fails inside the container"; fi
else
    t0=$(now); status=""
    while [ "$(elapsed "$t0" | cut -d. -f1)" -lt "$DEADLINE" ]; do
        status=$(docker inspect --format '{{.State.Health.Status}}' "$RUN"); [ "$status" = healthy ] && break; sleep 1
    done
    if [ "$status" = healthy ]; then pass "the image's HEALTHCHECK passes (docker: healthy)"
    else fail "the image's HEALTHCHECK: docker says '$status'"; fi
fi

# the readiness probe deploy/compose.yaml runs inside the container
if probe=$($ENGINE exec "$RUN" pgqr-probe /readyz 2>&1); then pass "readiness probe in the container: pgqr-probe $probe"
else fail "readiness probe in the container: pgqr-probe $probe"; fi

uid=$($ENGINE exec "$RUN" id -u 2>/dev/null)
if [ -n "$uid" ] && [ "$uid" != 0 ]; then pass "the running container's process is not root (id -u = $uid)"
else fail "the running container runs as root (id -u = '${uid:-?}')"; fi

# --- a webhook QR lands in the row -------------------------------------------------------------------------------
QR='data:image/png;base64,iVBORw0KGgo='
psql_db "INSERT INTO public.evolution_instances (instance_name, instance_token, instance_status)
         VALUES ('img-check', '$INSTANCE_TOKEN', 'connecting')" || fail "insert the img-check instance row"
body='{"event":"qrcode.updated","instance":"img-check","data":{"qrcode":{"instance":"img-check","pairingCode":null,"code":"2@abc","base64":"'"$QR"'"}},"apikey":null}'
code=$(curl -s -o "$work/body" -w '%{http_code}' -H 'Content-Type: application/json' --data "$body" \
    "http://127.0.0.1:$HTTP_PORT/webhooks/evolution/$WEBHOOK_SECRET")
info "webhook POST answered $code: $(cat "$work/body")"
t0=$(now); landed=""
while [ "$(elapsed "$t0" | cut -d. -f1)" -lt "$DEADLINE" ]; do
    [ "$(psql_db "SELECT qr_code = '$QR' FROM public.evolution_instances WHERE instance_name = 'img-check'")" = t ] \
        && { landed=1; break; }
    sleep 0.5
done
if [ -n "$landed" ]; then pass "webhook QR landed in evolution_instances.qr_code ($(elapsed "$t0") s after the POST)"
else fail "webhook QR not in evolution_instances.qr_code within $DEADLINE s (POST answered $code)"; fi

# --- SIGTERM: exit 0 within the grace period ---------------------------------------------------------------------
t0=$(now)
$ENGINE stop -t "$STOP_GRACE" "$RUN" >/dev/null 2>&1
took=$(elapsed "$t0")
exit_code=$($ENGINE inspect --format '{{.State.ExitCode}}' "$RUN")
if [ "$exit_code" = 0 ] && python3 -c "import sys; sys.exit(not float(sys.argv[1]) < float(sys.argv[2]))" "$took" "$STOP_GRACE"
then pass "stop (SIGTERM): exit status 0 after $took s (grace $STOP_GRACE s)"
else fail "stop (SIGTERM): exit status $exit_code after $took s (grace $STOP_GRACE s)"; fi

# --- no secret in the logs ---------------------------------------------------------------------------------------
$ENGINE logs "$RUN" >"$work/run.log" 2>&1
cat "$work/migrate.log" "$work/verify.log" >>"$work/run.log"
leaked=""
for name in PGQR_WEBHOOK_SECRET:$WEBHOOK_SECRET EVOLUTION_API_KEY:$API_KEY instance_token:$INSTANCE_TOKEN \
            database_password:$PG_PASSWORD; do
    # whole words: the token 'tok' is also the start of "token"
    grep -qwF -- "${name#*:}" "$work/run.log" && leaked="$leaked ${name%%:*}"
done
lines=$(grep -c . "$work/run.log")
if [ -z "$leaked" ]; then pass "no secret in the container logs ($lines lines: webhook secret, API key, token 'tok', DB password)"
else fail "secrets in the container logs:$leaked"
    # show where, with the values masked
    grep -nwF -e "$WEBHOOK_SECRET" -e "$API_KEY" -e "$INSTANCE_TOKEN" -e "$PG_PASSWORD" "$work/run.log" | head -5 \
        | sed -e "s/$WEBHOOK_SECRET/<webhook secret>/g; s/$API_KEY/<api key>/g; s/$PG_PASSWORD/<db password>/g" \
              -e "s/\\b$INSTANCE_TOKEN\\b/<token>/g; s/^/      /"
fi

# --- pg_cron's own job connection (libpq to localhost) works in the PostgreSQL image -----------------------------
# pg_cron starts jobs on the minute: this waits up to one minute boundary (plus a margin).
info "waiting for pg_cron's next minute to run pgqr-tick inside the PostgreSQL container"
t0=$(now); cron_status=""
while [ "$(elapsed "$t0" | cut -d. -f1)" -lt 80 ]; do
    cron_status=$(psql_db "SELECT d.status || coalesce(': ' || nullif(d.return_message, ''), '')
                           FROM cron.job_run_details d JOIN cron.job j USING (jobid)
                           WHERE j.jobname = 'pgqr-tick' AND d.status IN ('succeeded', 'failed')
                           ORDER BY d.runid DESC LIMIT 1" 2>/dev/null)
    [ -n "$cron_status" ] && break
    sleep 1
done
if [[ "$cron_status" == succeeded* ]]; then pass "pg_cron ran pgqr-tick over its localhost connection: $cron_status"
else fail "pg_cron's pgqr-tick run: ${cron_status:-none within 80 s}"; fi

if [ "$failures" -gt 0 ]; then echo "image-test: $failures check(s) FAILED"; exit 1; fi
echo "image-test: all checks passed"
