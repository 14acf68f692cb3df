"""What every phase shares: the options, the throwaway server, a work directory and the report."""

from __future__ import annotations

from pathlib import Path

from .. import devdb
from .options import FULL_ONLY, Options
from .report import Report, machine


class Bench:
    """One run of the bench; each phase reads its options and adds its figures to its report."""

    def __init__(self, options: Options, server: devdb.DevServer, workdir: Path) -> None:
        self.o = options
        self.server = server
        self.workdir = workdir
        self.report = Report(machine())
        self.fresh_share: dict[str, float] = {}  # freshness by mode, without skew: what the skewed rows compare to

    def wants(self, phase: str) -> bool:
        """Whether this run includes `phase`: the ones named by --phases, else all but FULL_ONLY under --quick."""
        if self.o.phases:
            return phase in self.o.phases
        return not (self.o.quick and phase in FULL_ONLY)
