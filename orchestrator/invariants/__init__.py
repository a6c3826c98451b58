"""Invariants: checks that take observations and return verdicts with evidence."""
