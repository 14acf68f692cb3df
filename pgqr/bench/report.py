"""The bench's table (one Figure a line, each with the load it was taken under) and the machine's facts."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import tables


@dataclass
class Figure:
    """One line of the table."""

    section: str
    measure: str
    value: str
    target: str = ""
    met: bool | None = None
    load: float = 0.0  # the machine's 1-minute load average when the figure was taken (the end of its phase)


@dataclass
class Report:
    machine: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(self, section: str, measure: str, value: str, target: str = "", met: bool | None = None) -> None:
        self.figures.append(Figure(section, measure, value, target, met, os.getloadavg()[0]))
        print(f"  {section}: {measure}: {value}" + (f" (target {target})" if target else ""), file=sys.stderr,
              flush=True)

    def table(self) -> str:
        head = ("section", "measure", "value", "target", "", "load")
        rows = [head] + [(f.section, f.measure, f.value, f.target,
                          "" if f.met is None else ("ok" if f.met else "MISSED"), f"{f.load:.2f}")
                         for f in self.figures]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        return "\n".join(tables.render([rows[0], tuple("-" * w for w in widths), *rows[1:]]))


# -- the machine -------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": model or platform.processor(), "load_at_start": os.getloadavg(),
            "python": platform.python_version()}


def _status_kib(pid: int | str, field: str) -> float:
    """One kB figure of /proc/PID/status (VmHWM, VmRSS), in KiB; NaN when the kernel does not report it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return float(line.split()[1])
    return float("nan")


def vm_hwm_mb(pid: int | str = "self") -> float:
    """Peak resident set size of a live process (VmHWM), in MiB."""
    return _status_kib(pid, "VmHWM") / 1024


def vm_rss_kib(pid: int | str = "self") -> float:
    """Resident set size of a live process now (VmRSS), in KiB."""
    return _status_kib(pid, "VmRSS")


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"
