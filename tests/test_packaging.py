"""The wheel ships the three packages and the SQL migrations, and installs both commands."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from orchestrator import migrate


def test_wheel_contains_packages_and_migrations(repo_root: Path, tmp_path: Path) -> None:
    """Building the wheel lists shared/, orchestrator/, daemon/ and every sql/ migration."""
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
    [wheel] = tmp_path.glob("tally-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} >= {"shared", "orchestrator", "daemon", "sql"}
    assert {f"sql/{m.filename}" for m in migrate.discover()} <= set(names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "tally = orchestrator.cli:main" in text and "tallyd = daemon.cli:main" in text
