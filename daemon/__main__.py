"""``python -m daemon`` is ``tallyd``."""

from daemon.cli import main

main()
