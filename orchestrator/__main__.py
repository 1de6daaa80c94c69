"""``python -m orchestrator`` is ``tally``."""

from orchestrator.cli import main

main()
