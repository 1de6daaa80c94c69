"""The Tally worker daemon (``tallyd``)."""
