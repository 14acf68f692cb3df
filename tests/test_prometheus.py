"""The Prometheus alerting rules (deploy/prometheus/) and the Grafana dashboard (deploy/grafana/pgqr.json) against
Debian's promtool and a real Prometheus (`make system` installs the `prometheus` package).

There is no Grafana here, so what is tested of the dashboard is its expressions: a real Prometheus scrapes a real
`pgqr run` against the simulator while the test drives QR codes, failures and webhooks with a wrong secret; then
every metric a panel, a variable or a rule selects has a series and every panel's expression returns samples."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import end_process
from service_fixtures import Env, start_pgqr, wait_until

from pgqr.devdb import free_port

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "pgqr-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "pgqr-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "pgqr.json"
PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
RUN_AS = "nobody"  # Prometheus needs no account of its own; as root it runs unprivileged
# what Grafana puts in for the dashboard's variables when it queries
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": "pgqr"}
# a series selector of a metric pgqr exposes (or Prometheus' own `up`), with its label matchers if any
SELECTOR = re.compile(r"(?<![\w:])(pgqr_[a-z_]+|up)\b(\{[^}]*\})?")

pytestmark = pytest.mark.usefixtures("no_cron_ticks")


def need(tool: Path) -> None:
    if not os.access(tool, os.X_OK):
        pytest.fail(f"{tool} is missing: run `make system` (it installs Debian's prometheus, which ships it)")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    need(PROMTOOL)
    return subprocess.run([str(PROMTOOL), *args], input=stdin, capture_output=True, text=True, timeout=60,
                          cwd=RULES.parent, check=False)


def alerts_in_rules() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.MULTILINE)


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panel_queries() -> dict[str, str]:
    """Every panel target's expression as Grafana sends it ("panel title/refId" -> PromQL)."""
    queries = {}
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries[f"{panel['title']}/{target['refId']}"] = expr
    return queries


def variable_queries() -> list[str]:
    return [v["query"]["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]


# -- the rules, in promtool ---------------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts_in_rules())} rules found" in result.stdout, result.stdout


def test_every_rule_is_unit_tested_firing_and_not_firing() -> None:
    cases = re.findall(r"alertname: (\w+)(?:,\s*|\s+)exp_alerts:\s*(\[\])?", RULE_TESTS.read_text())
    firing = {name for name, empty in cases if not empty}
    quiet = {name for name, empty in cases if empty}
    assert alerts_in_rules(), "no rules found"
    assert {name: (name in firing, name in quiet) for name in alerts_in_rules()} == dict.fromkeys(
        alerts_in_rules(), (True, True))


def test_the_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


# -- the dashboard's shape ------------------------------------------------------------------------------------


def test_the_dashboard_takes_its_data_source_and_job_from_variables() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert variables["job"]["type"] == "query"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    sources = {json.dumps(p["datasource"]) for p in board["panels"]}
    sources |= {json.dumps(t["datasource"]) for p in board["panels"] for t in p["targets"]}
    sources.add(json.dumps(variables["job"]["datasource"]))
    assert sources == {json.dumps({"type": "prometheus", "uid": "${datasource}"})}
    assert all(set(p["gridPos"]) == {"x", "y", "w", "h"} and p["targets"] for p in board["panels"])
    # every variable an expression uses is one Grafana or the dashboard defines
    assert not [q for q in panel_queries().values() if "$" in q]


# -- a real Prometheus scraping a real `pgqr run` -------------------------------------------------------------


@dataclass
class Prometheus:
    url: str
    base: Path

    def log(self) -> str:
        path = self.base / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.asynccontextmanager
async def running_prometheus(target_port: int) -> AsyncIterator[Prometheus]:
    """Debian's Prometheus on a free loopback port, ready, scraping pgqr on `target_port` every second as job "pgqr"
    and evaluating pgqr's rules every second; as root it runs as an unprivileged account."""
    need(PROMETHEUS)
    run_as = RUN_AS if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="pgqr-prometheus-"))
    port = free_port()
    shutil.copy(RULES, base / RULES.name)  # the account may not be able to read the repository
    (base / "prometheus.yml").write_text(f"""\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {RULES.name}
scrape_configs:
  - job_name: pgqr
    static_configs:
      - targets: ["127.0.0.1:{target_port}"]
""")
    (base / "data").mkdir()
    if run_as:
        account = pwd.getpwnam(run_as)
        for path in (base, base / "data", base / "prometheus.yml", base / RULES.name):
            os.chown(path, account.pw_uid, account.pw_gid)
    with (base / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={base / 'prometheus.yml'}", f"--storage.tsdb.path={base / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            user=run_as, cwd=base, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", base)
    try:
        async with aiohttp.ClientSession() as http:
            async def started() -> None:
                assert process.poll() is None, f"prometheus exited {process.returncode}: {prom.log()[-2000:]}"
                await _assert_ready(http, f"{prom.url}/-/ready")

            await eventually(started, 30, "Prometheus to start")
        yield prom
    finally:
        end_process(process, 15)
        shutil.rmtree(base, ignore_errors=True)


async def api(http: aiohttp.ClientSession, prom: Prometheus, path: str, **params: str) -> Any:
    """One call of Prometheus' HTTP API; its `data`, or an AssertionError naming Prometheus' error."""
    async with http.get(f"{prom.url}/api/v1/{path}", params=params) as resp:
        body = await resp.json()
    assert body["status"] == "success", f"{path} {params}: {body.get('errorType')}: {body.get('error')}"
    return body["data"]


async def eventually(check: Callable[[], Awaitable[None]], timeout: float, what: str) -> None:
    """Await check() until it returns without an AssertionError; the last one is raised at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await check()
            return
        except AssertionError as failure:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}: {failure}") from None
        await asyncio.sleep(0.5)


async def _assert_ready(http: aiohttp.ClientSession, url: str) -> None:
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=3)) as resp:
            assert resp.status == 200, f"{url}: {resp.status}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise AssertionError(f"{url}: {exc!r}") from None


@dataclass
class Run:
    """A `pgqr run` taking webhooks on `port` with `secret`, and the simulator's instances it refreshes."""

    port: int
    secret: str
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def pgqr_run(env: Env, tmp_path: Path, children: list[asyncio.subprocess.Process]) -> AsyncIterator[Run]:
    """`pgqr run` against the simulator, which sends it its webhooks; one instance gets QR codes, one gets 500s."""
    run = Run(free_port(), f"whs-{secrets.token_hex(12)}", tmp_path / "run.log")
    env.sim.config.global_webhook_url = f"{run.base}/webhooks/evolution/{run.secret}"
    env.add("fresh", sim_state="connecting")
    env.add("failing", sim_state="connecting", mode="http_500")
    children.append(await start_pgqr(env.command_env(PGQR_HTTP_PORT=str(run.port), PGQR_WEBHOOK_SECRET=run.secret,
                                                     PGQR_HTTP_TIMEOUT="2"), run.log, "run"))
    await wait_until(lambda: children[0].returncode is not None or env.has_qr("fresh"), 30, "the first QR")
    assert children[0].returncode is None, run.log.read_text()
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: _assert_ready(http, f"{run.base}/readyz"), 30, "readiness")
    yield run


async def wrong_secret_webhooks(run: Run, count: int) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(count):
            async with http.post(f"{run.base}/webhooks/evolution/{run.secret}-old",
                                 json={"event": "qrcode.updated", "instance": "fresh", "data": {}}) as resp:
                assert resp.status == 401


async def test_promtool_checks_the_metrics_of_pgqr_run(
        env: Env, tmp_path: Path, children: list[asyncio.subprocess.Process]) -> None:
    async with pgqr_run(env, tmp_path, children) as run, aiohttp.ClientSession() as http:
        env.sim.rotate("fresh")
        env.tick()
        await wrong_secret_webhooks(run, 1)
        text = ""

        async def every_labelled_metric_has_a_sample() -> None:
            nonlocal text
            async with http.get(f"{run.base}/metrics") as resp:
                text = await resp.text()
            # a poll that failed, a webhook, a rejection, a NOTIFY
            for sample in ('outcome="failed"', 'event="qrcode.updated"', 'reason="wrong_token"', 'source="notify"'):
                assert sample in text, sample

        await eventually(every_labelled_metric_has_a_sample, 30, "a sample of every labelled metric")
    result = promtool("check", "metrics", stdin=text)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


async def test_every_panel_and_rule_selects_series_of_a_real_pgqr_run_in_a_real_prometheus(
        env: Env, tmp_path: Path, children: list[asyncio.subprocess.Process]) -> None:
    async with (pgqr_run(env, tmp_path, children) as run, aiohttp.ClientSession() as http,
                running_prometheus(run.port) as prom):
        # what the panels show: QR codes by poll and by webhook, failures, ticks, a wrong secret
        env.sim.rotate("fresh")
        env.tick()
        await wrong_secret_webhooks(run, 1)
        await eventually(lambda: _has_series(http, prom, 'pgqr_webhook_rejections_total{reason="wrong_token"}'),
                         30, "the first scrapes")
        env.tick()  # a second NOTIFY, so the wake-ups counter rises under Prometheus' eyes
        await wrong_secret_webhooks(run, 6)  # a secret rotated on one side only

        rules = await _rule_queries(http, prom)
        selectors = {s for q in [*panel_queries().values(), *variable_queries(), *rules.values()]
                     for s in selectors_in(q)}

        async def every_selector_has_a_series() -> None:
            missing = [s for s in sorted(selectors) if not await _series(http, prom, s)]
            assert not missing, f"no series for {missing}"

        async def every_panel_returns_samples() -> None:
            empty = [title for title, query in panel_queries().items()
                     if not (await api(http, prom, "query", query=query))["result"]]
            assert not empty, f"no samples for {empty}"

        async def every_rule_evaluated_without_error() -> None:
            for rule in (await _rule_groups(http, prom))[0]["rules"]:
                assert rule["lastEvaluation"] > "2000", f"{rule['name']} not evaluated yet"
                assert (rule["name"], rule["health"], rule.get("lastError", "")) == (rule["name"], "ok", "")

        async def the_wrong_secret_alert_is_pending() -> None:
            alerts = (await api(http, prom, "alerts"))["alerts"]
            assert [(a["labels"]["reason"], a["state"]) for a in alerts
                    if a["labels"]["alertname"] == "PgqrWebhooksRejected"] == [("wrong_token", "pending")]

        await eventually(every_selector_has_a_series, 30, "a series of every metric used")
        await eventually(every_panel_returns_samples, 30, "samples on every panel")
        await eventually(every_rule_evaluated_without_error, 30, "the rules to be evaluated")
        await eventually(the_wrong_secret_alert_is_pending, 30, "PgqrWebhooksRejected to be pending")
        async with http.get(f"{run.base}/metrics") as resp:
            exposed = {line.split("{")[0].split(" ")[0] for line in (await resp.text()).splitlines()
                       if line and not line.startswith("#")}
        assert {s.split("{")[0] for s in selectors} - exposed == {"up"}  # pgqr's names, and Prometheus' up
        # the control: a misspelled metric selects nothing, so the checks above can fail
        assert not await _series(http, prom, 'pgqr_qr_valid_instance{job="pgqr"}')
        for query in panel_queries().values():  # and every panel's expression evaluates without error
            await api(http, prom, "query", query=query)
        assert run.secret not in prom.log()
    assert run.secret not in run.log.read_text()


def selectors_in(query: str) -> set[str]:
    return {name + (matchers or "") for name, matchers in SELECTOR.findall(query)}


async def _series(http: aiohttp.ClientSession, prom: Prometheus, selector: str) -> list[dict[str, str]]:
    found: list[dict[str, str]] = await api(http, prom, "series", **{"match[]": selector})
    return found


async def _has_series(http: aiohttp.ClientSession, prom: Prometheus, selector: str) -> None:
    assert await _series(http, prom, selector), selector


async def _rule_groups(http: aiohttp.ClientSession, prom: Prometheus) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = (await api(http, prom, "rules"))["groups"]
    assert [g["name"] for g in groups] == ["pgqr"]
    return groups


async def _rule_queries(http: aiohttp.ClientSession, prom: Prometheus) -> dict[str, str]:
    """The loaded rules' expressions (as Prometheus parsed them), by alert name: all of pgqr-rules.yml."""
    queries = {r["name"]: r["query"] for r in (await _rule_groups(http, prom))[0]["rules"]}
    assert sorted(queries) == sorted(alerts_in_rules())
    return queries
