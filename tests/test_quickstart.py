"""The README's Quickstart "on your own database", run as written: its lines, in a shell, against a database of the
test server, with free ports in place of 8080 and 8081. The first line (the virtualenv and `pip install`) is the one
not run: the suite already runs in the project's virtualenv, whose bin directory leads PATH."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Database, command_env

from pgqr import devdb

README = Path(__file__).resolve().parent.parent / "README.md"
INSTALL = "python3 -m venv .venv && . .venv/bin/activate && pip install '.[sim]'"
EXAMPLE_URL = "postgresql://postgres@localhost:5432/myapp"


def quickstart() -> list[str]:
    """The Quickstart's shell lines, as the README gives them."""
    block = README.read_text().split("<!-- quickstart:begin")[1].split("<!-- quickstart:end -->")[0]
    code = block.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in code.splitlines() if line.strip()]


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:  # the shell and what it left in the background (even after the shell ended): one group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for(predicate: object, timeout: float, what: str, output: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{output.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def test_the_quickstart_on_your_own_database_works_as_written(db: Database, tmp_path: Path,
                                                              shell: list[subprocess.Popen[bytes]]) -> None:
    lines = quickstart()
    assert lines[0] == INSTALL
    script = "\n".join(lines[1:])
    assert EXAMPLE_URL in script and "8081" in script and "8080" in script
    sim_port, http_port = devdb.free_port(), devdb.free_port()
    url = f"postgresql://{db.server.user}@{db.server.host}:{db.server.port}/{db.name}"
    script = script.replace(EXAMPLE_URL, url).replace("8081", str(sim_port)).replace("8080", str(http_port))
    output = tmp_path / "quickstart.log"
    env = command_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    with output.open("wb") as out:
        shell.append(subprocess.Popen(
            ["bash", "-c", f"set -e\n{script}\necho QUICKSTART-DONE\nwait"], env=env, cwd=tmp_path,
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    proc = shell[0]
    wait_for(lambda: proc.poll() is not None or "QUICKSTART-DONE" in output.read_text(errors="replace"), 180,
             "the Quickstart's lines to run", output)
    text = output.read_text(errors="replace")
    assert proc.poll() is None, text  # every line ran, and the simulator and `pgqr run` are still up
    # `pgqr status` listed both instances; `pgqr run` then keeps their QRs fresh from the simulator
    assert "sim-00001" in text and "sim-00002" in text
    wait_for(lambda: db.value("SELECT count(*) FROM public.evolution_instances WHERE qr_code LIKE 'data:image/%'")
             == 2, 120, "both instances' QR codes", output)
    # the link `pgqr link` printed opens the live page
    [link] = re.findall(rf"http://127\.0\.0\.1:{http_port}/instances/\S+", text)
    with urllib.request.urlopen(link, timeout=30) as resp:
        assert resp.status == 200 and b"Link WhatsApp" in resp.read()
