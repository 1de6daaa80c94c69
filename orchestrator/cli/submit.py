"""``tally submit``: jobs from flags or a JSONL file, optionally waiting for their totals."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import msgspec
from rich.console import Console
from rich.progress import Progress

from orchestrator.cli.common import data_dir_option
from orchestrator.client import TallyClient
from orchestrator.local.stack import read_state
from shared import protocol as p
from shared import specs
from shared.errors import ConfigError, TallyError
from shared.limits import MAX_MILLIS
from shared.settings import command_option, option, parse_labels


def resolve_endpoint(
    url: str | None, token: str | None, data_dir: Path | None
) -> tuple[str, str | None]:
    """The orchestrator URL and client token: flags/env, else the running `tally up`."""
    if url:
        return url, token
    state = read_state(data_dir)
    if state is None:
        raise ConfigError(
            "no --orchestrator given (TALLY_ORCHESTRATOR) and no `tally up` is running"
        )
    return str(state["url"]), token or state.get("clientToken")


def read_jsonl(path: Path) -> list[p.JobSpec]:
    """Job specs, one JSON object per line; errors name the line and field."""
    jobs: list[p.JobSpec] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            jobs.append(msgspec.json.decode(line, type=p.JobSpec))
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{path}:{number}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON: {exc}") from None
    if not jobs:
        raise ConfigError(f"{path}: no jobs")
    return jobs


submit_option = command_option("submit")


@click.command()
@option("--orchestrator", help="ws(s)://HOST:PORT/ws (default: the running `tally up`).")
@option("--token", envvar="TALLY_CLIENT_TOKEN", help="Client token.")
@data_dir_option
@submit_option("--executor", help="Executor of the job (one job from flags).")
@submit_option("--model", help="Model.")
@submit_option("--spec", "spec_json", default="{}", show_default=True, help="Executor input, JSON.")
@submit_option("--label", "labels", multiple=True, help="KEY=VALUE attribution label (repeat).")
@submit_option("--queue", default="default", show_default=True, help="Queue.")
@submit_option(
    "--max-attempts",
    type=click.IntRange(1, 100),
    default=3,
    show_default=True,
    help="Attempts before the job fails.",
)
@submit_option("--max-total-tokens", type=click.IntRange(min=1), help="Stop the job past this.")
@submit_option("--budget-usd", type=click.FloatRange(min=0), help="Stop the job past this cost.")
@submit_option(
    "--max-turns", type=click.IntRange(min=1), help="Stop the job after this many turns."
)
@submit_option(
    "--max-output-tokens", type=click.IntRange(min=1), help="Stop the job past this output."
)
@submit_option(
    "--timeout-ms", "job_timeout_ms", type=click.IntRange(min=1), help="Stop the job after this."
)
@submit_option(
    "--delay",
    default=None,
    help="Start no sooner than this after submission: 30s, 10m, 2h, 1d.",
)
@submit_option(
    "--not-before",
    default=None,
    help="Start no sooner than this ISO date/time (UTC unless it names a zone).",
)
@submit_option(
    "--priority",
    type=click.IntRange(min=-1000, max=1000),
    default=0,
    show_default=True,
    help="Higher runs first.",
)
@submit_option("--idempotency-key", help="A retried submit with this key returns the same job.")
@submit_option(
    "--file",
    "jsonl",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Many jobs, one JSON job object per line.",
)
@submit_option(
    "--wait",
    is_flag=True,
    help="Wait for the jobs and print their totals; exit 1 when any failed or was cancelled.",
)
@submit_option(
    "--timeout",
    "wait_timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="With --wait: give up after this many seconds (exit 1 naming the pending jobs).",
)
@submit_option(
    "--output",
    "show_output",
    is_flag=True,
    help="With --wait: print each job's answer (its output) after its totals.",
)
@submit_option(
    "--allow-unknown-executor",
    is_flag=True,
    help="Accept jobs for an executor no registered daemon offers yet (they wait for one).",
)
def submit(
    orchestrator: str | None,
    token: str | None,
    data_dir: Path | None,
    executor: str | None,
    model: str | None,
    spec_json: str,
    labels: tuple[str, ...],
    queue: str,
    max_attempts: int,
    max_total_tokens: int | None,
    budget_usd: float | None,
    max_turns: int | None,
    max_output_tokens: int | None,
    job_timeout_ms: int | None,
    delay: str | None,
    not_before: str | None,
    priority: int,
    idempotency_key: str | None,
    jsonl: Path | None,
    wait: bool,
    wait_timeout: float | None,
    show_output: bool,
    allow_unknown_executor: bool,
) -> None:
    """Submit one job from flags or many from a JSONL file."""
    delay_ms = start_delay_ms(delay, not_before)
    if jsonl is not None:
        jobs = read_jsonl(jsonl)
        if delay_ms is not None:
            jobs = [msgspec.structs.replace(j, delay_ms=delay_ms) for j in jobs]
    else:
        if not executor:
            raise ConfigError("give --executor (one job) or --file (many jobs)")
        try:
            spec: Any = json.loads(spec_json)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--spec: not valid JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise ConfigError("--spec: must be a JSON object")
        limits = p.Limits(
            max_total_tokens=max_total_tokens if max_total_tokens else msgspec.UNSET,
            budget_usd=budget_usd if budget_usd is not None else msgspec.UNSET,
            max_turns=max_turns if max_turns else msgspec.UNSET,
            max_output_tokens=max_output_tokens if max_output_tokens else msgspec.UNSET,
            timeout_ms=job_timeout_ms if job_timeout_ms else msgspec.UNSET,
        )
        jobs = [
            p.JobSpec(
                executor=executor,
                model=model or msgspec.UNSET,
                spec=spec,
                limits=limits,
                labels=parse_labels(labels),
                queue=queue,
                max_attempts=max_attempts,
                priority=priority,
                idempotency_key=idempotency_key or msgspec.UNSET,
                delay_ms=delay_ms if delay_ms is not None else msgspec.UNSET,
            )
        ]
    if wait_timeout is not None and not wait:
        raise ConfigError("--timeout: only with --wait")
    if show_output and not wait:
        raise ConfigError("--output: only with --wait")
    check_specs(jobs, "--file" if jsonl is not None else "--spec")
    url, client_token = resolve_endpoint(orchestrator, token, data_dir)
    options = SubmitOptions(wait, wait_timeout, show_output, allow_unknown_executor)
    asyncio.run(_submit(url, client_token, jobs, options))


@dataclass(frozen=True, slots=True)
class SubmitOptions:
    """How to submit and what to print."""

    wait: bool
    timeout: float | None
    show_output: bool
    allow_unknown_executor: bool


def check_specs(jobs: list[p.JobSpec], source: str) -> None:
    """Refuse, before anything is sent, a spec its built-in executor cannot run (exit 2)."""
    bad = specs.first_bad(jobs)
    if bad is not None:
        i, exc = bad
        where = f" line {i + 1}" if source == "--file" else ""
        raise ConfigError(f"{source}{where} ({jobs[i].executor}): {exc}")


_DELAY = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_DELAY_UNIT_MS = {"ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3, "d": 86400e3}


def start_delay_ms(delay: str | None, not_before: str | None) -> float | None:
    """``--delay`` or ``--not-before`` as a delay in ms from now (the wire's ``delayMs``)."""
    if delay is not None and not_before is not None:
        raise ConfigError("give --delay or --not-before, not both")
    if delay is not None:
        match = _DELAY.match(delay.strip())
        if not match:
            raise ConfigError(f"--delay {delay!r}: expected a duration like 30s, 10m, 2h or 1d")
        ms = float(match.group(1)) * _DELAY_UNIT_MS[match.group(2)]
    elif not_before is not None:
        try:
            when = datetime.fromisoformat(not_before)
        except ValueError:
            raise ConfigError(f"--not-before {not_before!r}: expected an ISO date/time") from None
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        ms = max(0.0, (when - datetime.now(UTC)).total_seconds() * 1000)
    else:
        return None
    if ms > MAX_MILLIS:
        raise ConfigError(f"--delay/--not-before: at most {MAX_MILLIS / 86400e3:,.0f} days ahead")
    return ms


async def _submit(url: str, token: str | None, jobs: list[p.JobSpec], opts: SubmitOptions) -> None:
    console = Console(stderr=True)
    timeout = opts.timeout
    async with TallyClient(url, token) as client:
        ids = await client.submit(jobs, opts.allow_unknown_executor)
        if not opts.wait:
            for job_id in ids:
                click.echo(job_id)
            return
        finals: dict[str, p.UpdatePayload] = {}
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("jobs", total=len(set(ids)))
            await client.watch(ids)
            try:
                async with asyncio.timeout(timeout):
                    async for update in client.updates():
                        if update.status in p.TERMINAL_JOB_STATES:
                            finals[update.job_id] = update
                            progress.update(task, completed=len(finals))
                            if len(finals) >= len(set(ids)):
                                break
            except TimeoutError:
                pass
    _report(ids, finals, timeout, opts.show_output)


def _report(
    ids: list[str],
    finals: dict[str, p.UpdatePayload],
    timeout: float | None,
    show_output: bool = False,
) -> None:
    """One JSON line per finished job; exit 1 naming what did not succeed or did not finish."""
    pending = [job_id for job_id in dict.fromkeys(ids) if job_id not in finals]
    for job_id in dict.fromkeys(ids):
        final = finals.get(job_id)
        if final is None:
            continue
        totals = msgspec.to_builtins(final.totals) if isinstance(final.totals, p.JobTotals) else {}
        line: dict[str, Any] = {"jobId": job_id, "status": final.status, **totals}
        if show_output and not isinstance(final.output, msgspec.UnsetType):
            line["output"] = final.output
            if final.output_truncated is True:
                line["outputTruncated"] = True
        click.echo(json.dumps(line, ensure_ascii=False))
    if pending:
        raise TallyError(
            f"--timeout {timeout:g}s passed with {len(pending)} of {len(set(ids))} jobs still "
            f"pending: {', '.join(pending)}"
        )
    unsuccessful = [
        f"{j} {finals[j].status}" for j in dict.fromkeys(ids) if finals[j].status != "succeeded"
    ]
    if unsuccessful:
        raise TallyError(
            f"{len(unsuccessful)} of {len(set(ids))} jobs did not succeed: "
            + ", ".join(unsuccessful)
        )
