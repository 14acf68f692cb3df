# pgqr as a container sidecar next to PostgreSQL (deploy/compose.yaml runs the whole set; README "Container").
#   docker run --rm -e DATABASE_URL=... pgqr migrate          (once per release, e.g. an init container)
#   docker run -e DATABASE_URL=... -e EVOLUTION_API_URL=... -e PGQR_WEBHOOK_SECRET=... -p 8080:8080 pgqr
# Health: GET /healthz (alive: the HEALTHCHECK below), GET /readyz (listening, last reconcile ok),
# GET /metrics (Prometheus); Evolution webhooks: POST /webhooks/evolution/$PGQR_WEBHOOK_SECRET.
# Secrets (DATABASE_URL's password, EVOLUTION_API_KEY, PGQR_WEBHOOK_SECRET) come from the environment at run
# time; nothing secret is baked into the image.
FROM python:3.11-slim

# a fixed numeric uid/gid, so `runAsNonRoot` and volume ownership can be checked without /etc/passwd
RUN groupadd --system --gid 10001 pgqr \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin pgqr

# The package only: no tests, no extras (the simulator's dependencies stay out of the image).
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY pgqr ./pgqr
COPY sql ./sql
RUN PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore pip install --no-cache-dir . \
 && rm -rf /src
WORKDIR /
COPY deploy/pgqr-probe /usr/local/bin/pgqr-probe

USER 10001:10001
ENV PGQR_HTTP_HOST=0.0.0.0 \
    PGQR_HTTP_PORT=8080 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
EXPOSE 8080
# Liveness, on $PGQR_HTTP_PORT as set at run time; readiness is `pgqr-probe /readyz` (see deploy/compose.yaml).
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 CMD ["pgqr-probe", "/healthz"]
# SIGTERM drains in-flight calls within PGQR_GRACE_SECONDS (default 10), releases leases and exits 0:
# give the container a stop timeout above that (docker stop -t 15, compose stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["pgqr"]
CMD ["run"]
