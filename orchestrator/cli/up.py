"""``tally up``: embedded PostgreSQL, migrations, `tally serve` and N `tallyd` as children."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

import click
from rich.console import Console

from orchestrator.cli.common import data_dir_option
from orchestrator.local.embedded import default_data_dir, embedded_database
from orchestrator.local.stack import free_port, state_file
from orchestrator.store import migrations as migrate
from orchestrator.store.db import connection
from shared.errors import TallyError
from shared.locks import exclusive
from shared.settings import option


def _pump(stream: IO[bytes], prefix: str) -> None:
    for raw in iter(stream.readline, b""):
        sys.stderr.write(f"{prefix} {raw.decode(errors='replace')}")
        sys.stderr.flush()


class Children:
    """Child processes with prefixed output, stopped together."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start a child whose stdout/stderr lines are prefixed with its name."""
        proc = subprocess.Popen(
            [sys.executable, "-m", *args],
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert proc.stdout is not None
        threading.Thread(target=_pump, args=(proc.stdout, f"[{name}]"), daemon=True).start()
        self.procs.append((name, proc))
        return proc

    def stop(self, names_first: tuple[str, ...] = ("tallyd",), timeout: float = 30) -> None:
        """SIGTERM daemons first (they drain), then the orchestrator."""
        for group in (names_first, ("",)):
            batch = [
                (n, p)
                for n, p in self.procs
                if (n.startswith(group) if group != ("",) else True) and p.poll() is None
            ]
            for _, proc in batch:
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for _, proc in batch:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _real_providers() -> list[str]:
    """Real providers whose API key is in the environment and whose SDK is installed."""
    import importlib.util

    found = []
    for name, module, key in (
        ("anthropic", "anthropic", "ANTHROPIC_API_KEY"),
        ("openai", "openai", "OPENAI_API_KEY"),
        ("ollama", "ollama", "OLLAMA_HOST"),
        ("gemini", "google.genai", "GEMINI_API_KEY"),
        ("claude-agent", "claude_agent_sdk", "ANTHROPIC_API_KEY"),
    ):
        if os.environ.get(key) and importlib.util.find_spec(module) is not None:
            found.append(name)
    return found


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TallyError(f"tally serve exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise TallyError(f"tally serve not ready after {timeout:.0f}s ({url})")


@click.command()
@option(
    "--daemons",
    type=click.IntRange(min=0, max=64),
    default=2,
    show_default=True,
    help="How many tallyd processes to start.",
)
@option(
    "--concurrency",
    type=click.IntRange(min=1, max=1000),
    default=8,
    show_default=True,
    help="Jobs each daemon runs at once.",
)
@option("--demo", is_flag=True, help="Submit a mixed batch, show progress, print usage, exit.")
@data_dir_option
@option(
    "--port",
    type=click.IntRange(min=0, max=65535),
    default=0,
    help="Orchestrator port on 127.0.0.1 (0: any free port).",
)
def up(daemons: int, concurrency: int, demo: bool, data_dir: Path | None, port: int) -> None:
    """Run the whole stack locally; with --demo, run a demo batch and exit 0."""
    data_dir = (data_dir or default_data_dir()).resolve()
    # A second `tally up` on one directory would share daemon ids and outboxes, and remove
    # the first one's up.json when it exits.
    with exclusive(data_dir, "up.lock", "`tally up`"):
        _up(daemons, concurrency, demo, data_dir, port)


def _up(daemons: int, concurrency: int, demo: bool, data_dir: Path, port: int) -> None:
    console = Console(stderr=True)
    daemon_token, client_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    port = port or free_port()
    url = f"ws://127.0.0.1:{port}/ws"
    children = Children()
    with embedded_database(data_dir) as dsn:

        async def prepare() -> None:
            async with connection(dsn) as conn:
                await migrate.up(conn, migrate.discover())

        asyncio.run(prepare())
        serve = children.start(
            "serve",
            ["orchestrator", "serve", "--listen", f"127.0.0.1:{port}", "--log-level", "warning"],
            {
                "TALLY_DATABASE_URL": dsn,
                "TALLY_DAEMON_TOKENS": daemon_token,
                "TALLY_CLIENT_TOKENS": client_token,
            },
        )
        try:
            _wait_ready(f"http://127.0.0.1:{port}/readyz", serve)
            executors = ["simulated", *_real_providers()]
            for i in range(daemons):
                children.start(
                    f"tallyd-{i + 1}",
                    [
                        "daemon",
                        "--orchestrator",
                        url,
                        "--max-concurrent-jobs",
                        str(concurrency),
                        "--state-dir",
                        str(data_dir / "daemons" / f"d{i + 1}"),
                        "--daemon-id",
                        f"local-{i + 1}",
                        *(arg for name in executors for arg in ("--executor", name)),
                        "--log-level",
                        "warning",
                    ],
                    {"TALLY_TOKEN": daemon_token},
                )
            state_file(data_dir).write_text(
                json.dumps(
                    {
                        "url": url,
                        "clientToken": client_token,
                        "daemonToken": daemon_token,
                        "metrics": f"http://127.0.0.1:{port}/metrics",
                        "databaseUrl": dsn,
                    }
                )
            )
            os.chmod(state_file(data_dir), 0o600)
            console.print(
                f"[bold]tally up[/bold]: orchestrator {url}  "
                f"metrics http://127.0.0.1:{port}/metrics  daemons {daemons}"
            )
            console.print(
                "connect another daemon: "
                f'TALLY_TOKEN=$(python -c "import json;print(json.load(open('
                f"'{state_file(data_dir)}'))['daemonToken'])\") "
                f"tallyd --orchestrator {url}"
            )
            if demo:
                from orchestrator.cli.demo import run_demo

                asyncio.run(run_demo(url, client_token, dsn, console))
            else:
                console.print("press Ctrl-C to stop")
                stop = threading.Event()
                signal.signal(signal.SIGTERM, lambda *_: stop.set())
                try:
                    while not stop.wait(0.5):
                        if serve.poll() is not None:
                            raise TallyError(f"tally serve exited with code {serve.returncode}")
                except KeyboardInterrupt:
                    pass
        finally:
            console.print("stopping daemons and orchestrator")
            children.stop()
            state_file(data_dir).unlink(missing_ok=True)
