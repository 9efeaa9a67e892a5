"""Benchmarks of the amorlip trainer: step time, open_clip comparison, data throughput, quality.

Speed goals live here and never in unit tests (timings on shared machines are noisy). Each module
prints a table and writes ``benchmarks/results/<name>.json``; ``python -m benchmarks.run_all`` runs
the CPU set, ``benchmarks/gpu.sh`` the GPU one. ``benchmarks/RESULTS.md`` records the latest figures.
"""
