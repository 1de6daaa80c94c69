"""The local stack: the embedded PostgreSQL, `tally up`'s state file and the demo."""
