"""Typed settings helpers: every flag has a ``TALLY_<FLAG>`` env mirror (flag > env > default)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from shared.errors import ConfigError, TallyError

F = TypeVar("F", bound=Callable[..., Any])


def env_name(flag: str) -> str:
    """``--database-url`` -> ``TALLY_DATABASE_URL``."""
    return "TALLY_" + flag.lstrip("-").replace("-", "_").upper()


def option(flag: str, *decls: str, envvar: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """A click option whose environment mirror is ``TALLY_<FLAG>`` and shown in ``--help``."""
    return click.option(flag, *decls, envvar=envvar or env_name(flag), show_envvar=True, **kwargs)


def command_option(command: str) -> Callable[..., Callable[[F], F]]:
    """``option`` whose environment mirror is ``TALLY_<COMMAND>_<FLAG>``.

    For the flags of client commands that share a name with another command's (``tally jobs
    --label`` filters, ``tallyd --label`` advertises): ``TALLY_LABEL`` set for a daemon must not
    silently filter ``tally jobs``.
    """

    def make(flag: str, *decls: str, **kwargs: Any) -> Callable[[F], F]:
        envvar = "TALLY_" + command.upper() + "_" + flag.lstrip("-").replace("-", "_").upper()
        return option(flag, *decls, envvar=envvar, **kwargs)

    return make


def split_list(values: Sequence[str] | str | None) -> tuple[str, ...]:
    """Flatten repeated flags and comma/space separated env values into a tuple."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        out.extend(part for part in value.replace(",", " ").split() if part)
    return tuple(out)


def parse_listen(value: str, flag: str = "--listen") -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6), raising ConfigError naming the flag."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{flag} {value!r}: expected HOST:PORT with a port from 0 to 65535")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def run_cli(
    group: click.Command,
    prog: str,
    argv: Sequence[str] | None = None,
    explain: Callable[[Exception], TallyError | None] | None = None,
) -> int:
    """Run a click group; print any failure as one line and return the documented exit code.

    ``explain`` turns a library's exception (a database without the schema, ...) into the
    TallyError that says what to do; anything else unexpected is still one line (exit 1),
    its traceback only with ``TALLY_DEBUG=1``.
    """
    try:
        return _run(group, prog, argv)
    except Exception as exc:
        known = explain(exc) if explain is not None else None
        if known is not None:
            print(f"{prog}: error: {known}", file=sys.stderr)
            return known.exit_code
        if os.environ.get("TALLY_DEBUG"):
            raise
        print(f"{prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _run(group: click.Command, prog: str, argv: Sequence[str] | None) -> int:
    try:
        result = group.main(args=argv, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.Abort:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except click.ClickException as exc:
        print(f"{prog}: error: {exc.format_message()}", file=sys.stderr)
        return 2
    except TallyError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return int(result) if isinstance(result, int) else 0


def log_level_option() -> Callable[[F], F]:
    """The ``--log-level`` option every long-running command takes."""
    return option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"]),
        default="info",
        show_default=True,
        help="Log verbosity.",
    )


def log_format_option() -> Callable[[F], F]:
    """The ``--log-format`` option every long-running command takes."""
    return option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="Log records as text lines, or one JSON object per line for log pipelines.",
    )


def configure_logging(level: str, fmt: str = "text") -> None:
    """One-line log records on stderr: text, or one JSON object per line (python-json-logger:
    timestamp, level, logger, message, and each record's extra fields)."""
    import logging

    if fmt != "json":
        logging.basicConfig(
            level=getattr(logging, level.upper()),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        return
    from pythonjsonlogger.json import JsonFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "timestamp", "levelname": "level", "name": "logger"},
            datefmt="%Y-%m-%dT%H:%M:%S%z",
            json_ensure_ascii=False,
        )
    )
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


def parse_labels(values: Sequence[str], flag: str = "--label") -> dict[str, str]:
    """``KEY=VALUE`` pairs, raising ConfigError naming the flag."""
    out: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {value!r}: expected KEY=VALUE")
        out[key] = val
    return out
