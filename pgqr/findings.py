"""What one `pgqr doctor` check found, and its fix: shared by the database checks (doctor.py) and the Evolution
checks (doctor_evolution.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    """One doctor finding: `fix` says what to do when it failed."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"PASS  {self.name}: {self.detail}"
        return f"FAIL  {self.name}: {self.detail}" + (f" -> fix: {self.fix}" if self.fix else "")
