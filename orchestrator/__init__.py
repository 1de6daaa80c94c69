"""The Tally orchestrator: server, dispatch, ledger writer, metrics, migrations and the CLI."""
