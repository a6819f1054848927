"""Tests of pairtrace.judges."""
