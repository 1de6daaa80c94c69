"""The local stack: the embedded PostgreSQL and `tally up`'s state file."""
