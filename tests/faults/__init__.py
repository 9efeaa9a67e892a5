"""Fault-injection tests (issue 8): real kills, real corrupt data, real servers; see docs/failure-modes.md."""
