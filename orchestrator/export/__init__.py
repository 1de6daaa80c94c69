"""OpenTelemetry export of the ledger (``tally serve --otlp-endpoint``, the ``otel`` extra).

The ledger is the export's queue: an attempt is exported once it is decided and committed,
read back from PostgreSQL, so what a backend receives is what the ledger holds, and a
restart resumes from what was committed rather than from memory.
"""
