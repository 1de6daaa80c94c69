"""Every CLI failure is one line on stderr with its documented exit code, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def _one_line(done: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize(
    "command",
    [
        ["usage"],
        ["usage", "--format", "json"],
        ["jobs"],
        ["jobs", "show", "0d5e6f4b-7a1c-4d2e-8f3a-1b2c3d4e5f60"],
    ],
)
def test_reports_on_an_unmigrated_database_say_to_migrate(
    empty_db_url: str, command: list[str]
) -> None:
    """`tally usage` and `tally jobs` on a database without the schema: one line, exit 2,
    naming `tally migrate up`."""
    done = _run("-m", "orchestrator", *command, "--database-url", empty_db_url)
    _one_line(done, 2, "tally migrate up")


def test_reports_on_a_fresh_data_directory_start_no_database(tmp_path: Path) -> None:
    """`tally usage` on a data directory without a database says so and creates nothing."""
    done = _run("-m", "orchestrator", "usage", "--data-dir", str(tmp_path / "none"))
    _one_line(done, 2, "no Tally database", "tally up")
    assert not (tmp_path / "none").exists()


def test_serve_with_a_bad_tls_certificate_is_one_line(tmp_path: Path) -> None:
    """A certificate or key that does not load is a configuration error naming both files."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    done = _run(
        "-m",
        "orchestrator",
        "serve",
        "--insecure",
        "--database-url",
        "postgresql://nobody@127.0.0.1:9/none",
        "--tls-cert",
        str(bad),
        "--tls-key",
        str(bad),
    )
    _one_line(done, 2, "--tls-cert", "cannot load")


def test_daemon_without_the_sdk_is_one_line(tmp_path: Path) -> None:
    """`tallyd --executor anthropic` without the SDK: one line naming the extra, exit 2."""
    shim = tmp_path / "shim" / "anthropic"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'anthropic'\")\n")
    done = _run(
        "-m",
        "daemon",
        "--orchestrator",
        "ws://127.0.0.1:9/ws",
        "--state-dir",
        str(tmp_path / "state"),
        "--executor",
        "anthropic",
        env={"PYTHONPATH": str(tmp_path / "shim")},
    )
    _one_line(done, 2, "--executor anthropic", "not installed")


async def test_jobs_formats_prefixes_and_per_command_environment(db_url: str) -> None:
    """`tally jobs --format json|csv`, `jobs show PREFIX --format json`, an ambiguous or short
    prefix refused in one line, and a daemon's TALLY_LABEL does not filter `tally jobs`."""
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "INSERT INTO jobs (id, executor, labels) VALUES "
            "('abcd0000-0000-4000-8000-000000000001', 'simulated', '{\"team\": \"a\"}'),"
            "('abcd0000-0000-4000-8000-000000000002', 'simulated', '{\"team\": \"b\"}'),"
            "('beef0000-0000-4000-8000-000000000003', 'simulated', '{}')"
        )
    finally:
        await conn.close()
    base = ("-m", "orchestrator", "jobs", "--database-url", db_url)
    listed = _run(*base, "--format", "json", env={"TALLY_LABEL": "team=a"})
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == 3 and rows[0]["input_tokens"] is None  # unknown, not 0
    filtered = _run(*base, "--format", "csv", env={"TALLY_JOBS_LABEL": "team=a"})
    assert filtered.stdout.splitlines()[1].startswith("abcd0000-0000-4000-8000-000000000001")
    assert len(filtered.stdout.splitlines()) == 2
    shown = _run(*base, "show", "beef", "--format", "json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["job"]["id"] == "beef0000-0000-4000-8000-000000000003"
    _one_line(_run(*base, "show", "abcd"), 2, "ambiguous")
    _one_line(_run(*base, "show", "ab"), 2, "at least 4")
    _one_line(_run(*base, "show", "zz-top"), 2, "expected a job id")


def test_a_second_daemon_on_one_state_directory_is_refused(tmp_path: Path) -> None:
    """Two tallyd on one state directory would share an id and an outbox: the second says
    which process holds it and exits 2; the first runs on."""
    args = ("-m", "daemon", "--orchestrator", "ws://127.0.0.1:9/ws", "--state-dir", str(tmp_path))
    first = subprocess.Popen([sys.executable, *args], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "tallyd.lock").exists() or not (tmp_path / "tallyd.lock").read_text():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        second = _run(*args)
        _one_line(second, 2, "in use by another tallyd", f"pid {first.pid}")
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(30)


def test_a_second_tally_up_on_one_data_directory_is_refused(tmp_path: Path) -> None:
    """While one `tally up` holds a data directory, another on it exits 2 in one line and
    touches nothing (no database started, the first one's up.json kept)."""
    from shared.locks import exclusive

    (tmp_path / "up.json").write_text("{}")
    with exclusive(tmp_path, "up.lock", "`tally up`"):
        done = _run("-m", "orchestrator", "up", "--data-dir", str(tmp_path), "--demo")
    _one_line(done, 2, "in use by another `tally up`", f"pid {os.getpid()}")
    assert (tmp_path / "up.json").read_text() == "{}" and not (tmp_path / "pgdata").exists()


def test_both_commands_report_the_installed_version() -> None:
    """`tally --version` and `tallyd --version` read the tally-ledger distribution."""
    for module, prog in (("orchestrator", "tally"), ("daemon", "tallyd")):
        done = _run("-m", module, "--version")
        assert done.returncode == 0 and done.stdout.startswith(f"{prog}, version "), done
