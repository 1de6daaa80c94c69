"""Benchmarks (`tally bench`) and what they need: the load generator and the seeding."""
