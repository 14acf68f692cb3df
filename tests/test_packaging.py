"""The package as users get it (issue 22): the wheel carries the whole package, the migrations, the typing marker
and the license, and nothing else; the sdist carries what a rebuild needs; the metadata is complete.

Built once here with this virtualenv's hatchling (`python -m build --no-isolation`: the sdist, then the wheel from
that sdist). `make wheel-check` (deploy/wheel-check.sh, which CI runs) builds in an isolated environment, runs
`twine check --strict`, installs the wheel into a fresh virtualenv and migrates a throwaway PostgreSQL with it.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from email.message import Message
from email.parser import HeaderParser
from pathlib import Path

import pytest
from conftest import Database

import pgqr
from pgqr import migrations

ROOT = Path(__file__).resolve().parent.parent
SQL = sorted(path.name for path in (ROOT / "sql").glob("*.sql"))
DIST_INFO = f"pgqr-{pgqr.__version__}.dist-info"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sdist, wheel), built from this working tree."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sdist,), (wheel,) = list(out.glob("pgqr-*.tar.gz")), list(out.glob("pgqr-*-py3-none-any.whl"))
    return sdist, wheel


@pytest.fixture(scope="module")
def wheel(dist: tuple[Path, Path]) -> Iterator[zipfile.ZipFile]:
    with zipfile.ZipFile(dist[1]) as archive:
        yield archive


@pytest.fixture(scope="module")
def metadata(wheel: zipfile.ZipFile) -> Message:
    return HeaderParser().parsestr(wheel.read(f"{DIST_INFO}/METADATA").decode())


def test_the_wheel_holds_the_package_and_the_migrations_and_nothing_else(wheel: zipfile.ZipFile) -> None:
    package = {f"pgqr/{path.relative_to(ROOT / 'pgqr').as_posix()}" for path in (ROOT / "pgqr").rglob("*")
               if path.is_file() and "__pycache__" not in path.parts}
    shipped = {name for name in wheel.namelist() if not name.startswith(f"{DIST_INFO}/")}
    assert shipped == package | {f"pgqr/sql/{name}" for name in SQL}
    assert "pgqr/py.typed" in shipped  # mypy users type-check against the installed package
    for name in SQL:  # byte for byte: each migration's checksum is recorded in the database it was applied to
        assert wheel.read(f"pgqr/sql/{name}") == (ROOT / "sql" / name).read_bytes(), name


def test_the_wheel_carries_the_license_and_the_pgqr_command(wheel: zipfile.ZipFile) -> None:
    assert wheel.read(f"{DIST_INFO}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
    entry_points = wheel.read(f"{DIST_INFO}/entry_points.txt").decode()
    assert "[console_scripts]\npgqr = pgqr.cli:main\n" in entry_points


def test_the_metadata_is_complete(metadata: Message) -> None:
    assert metadata["Name"] == "pgqr" and metadata["Version"] == pgqr.__version__
    assert metadata["Summary"] and metadata["Keywords"]
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert metadata.get_payload().startswith("# pgqr\n")  # the README is the long description
    assert metadata["Requires-Python"] == ">=3.11"
    assert metadata["Author"] == metadata["Maintainer"] == "pgqr developers"
    assert (metadata["License-Expression"], metadata["License-File"]) == ("MIT", "LICENSE")
    classifiers = metadata.get_all("Classifier")
    assert {"Framework :: AsyncIO", "Programming Language :: Python :: 3.11", "Typing :: Typed",
            "Operating System :: POSIX :: Linux"} <= set(classifiers)
    assert any(c.startswith("Development Status :: ") for c in classifiers)
    assert any(c.startswith("Topic :: ") for c in classifiers)
    # PEP 639: License-Expression replaces the License :: classifiers, and setuptools refuses the two together
    assert not [c for c in classifiers if c.startswith("License ::")]


def test_the_sdist_carries_what_a_rebuild_needs_and_no_local_clutter(dist: tuple[Path, Path]) -> None:
    top = f"pgqr-{pgqr.__version__}"
    with tarfile.open(dist[0]) as archive:
        names = {name.removeprefix(f"{top}/") for name in archive.getnames()}
    assert {"pyproject.toml", "README.md", "LICENSE", "PKG-INFO", "pgqr/__init__.py", "pgqr/py.typed"} <= names
    assert {f"sql/{name}" for name in SQL} <= names
    assert not [name for name in names if name.split("/")[0] in {".venv", ".git", "dist", "build"}
                or "__pycache__" in name.split("/")]


def test_the_wheel_migrates_without_the_repository(db: Database, dist: tuple[Path, Path], tmp_path: Path) -> None:
    """The wheel unpacked on its own (no pip, no repository on the path) finds its migrations and applies them all."""
    site = tmp_path / "site"
    with zipfile.ZipFile(dist[1]) as archive:
        archive.extractall(site)

    def unpacked(*args: str) -> subprocess.CompletedProcess[str]:
        env = {"DATABASE_URL": db.dsn, "PYTHONPATH": str(site)}
        return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL, check=False)

    found = unpacked("-c", "from pgqr import migrations; print(migrations.sql_dir())")
    assert found.stdout.strip() == str(site / "pgqr" / "sql"), found.stderr  # not the repository's sql/
    result = unpacked("-m", "pgqr", "migrate")
    assert result.returncode == 0, result.stderr
    applied = [line.removeprefix("applied ") for line in result.stdout.splitlines() if line.startswith("applied ")]
    assert applied == SQL == [m.name for m in migrations.load()]
    assert db.value("SELECT count(*) FROM pgqr.migrations") == len(SQL)
