"""One root exception per concern, each carrying the process exit code it maps to."""

from __future__ import annotations


class TallyError(Exception):
    """Root of every error Tally raises on purpose; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class ConfigError(TallyError):
    """A flag, environment variable or configuration value is wrong (exit 2)."""

    exit_code = 2


class AuthError(TallyError):
    """The orchestrator refused our credentials (exit 3)."""

    exit_code = 3


class StoreError(TallyError):
    """The database could not be reached or refused a statement."""


class SchemaMismatchError(StoreError):
    """The database schema differs from the migrations this code ships."""

    exit_code = 2


class MigrationError(TallyError):
    """A migration file or the migration history is invalid."""


class ExecutorError(TallyError):
    """An executor could not run a job (configuration or provider failure)."""
