"""The wheel ships the three packages and the SQL migrations, and installs both commands."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from orchestrator.store import migrations as migrate


def test_wheel_contains_packages_and_migrations(repo_root: Path, tmp_path: Path) -> None:
    """The wheel (distribution tally-ledger) holds shared/, orchestrator/ and daemon/, and every
    sql/ migration inside the orchestrator package, with no top-level sql package."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(tmp_path),
            str(repo_root),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    [wheel] = tmp_path.glob("tally_ledger-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops >= {"shared", "orchestrator", "daemon"} and "sql" not in tops
    shipped = {f"orchestrator/migrations/{m.filename}" for m in migrate.discover()}
    assert shipped <= set(names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "tally = orchestrator.cli:main" in text and "tallyd = daemon.cli:main" in text
