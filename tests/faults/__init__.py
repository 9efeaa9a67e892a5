"""Fault-injection tests: real kills, real corrupt data, real servers; see docs/failure-modes.md."""
