# pgqr as a container sidecar next to PostgreSQL.
#   docker run --rm -e DATABASE_URL=... pgqr migrate          (once per release, e.g. an init container)
#   docker run -e DATABASE_URL=... -e EVOLUTION_API_URL=... -e PGQR_WEBHOOK_SECRET=... -p 8080:8080 pgqr
# Health: GET /healthz (alive), GET /readyz (listening), GET /metrics (Prometheus);
# Evolution webhooks: POST /webhooks/evolution/$PGQR_WEBHOOK_SECRET
FROM python:3.11-slim

RUN useradd --system --uid 10001 --no-create-home pgqr
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pgqr ./pgqr
COPY sql ./sql
RUN pip install --no-cache-dir . && rm -rf /src

USER pgqr
ENV PGQR_HTTP_HOST=0.0.0.0 \
    PGQR_HTTP_PORT=8080 \
    PYTHONUNBUFFERED=1
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"
# SIGTERM drains in-flight calls within PGQR_GRACE_SECONDS (default 10) and releases leases.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pgqr"]
CMD ["run"]
