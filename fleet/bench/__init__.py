"""Benchmark harnesses behind ``fleet bench ...``; the method and measured numbers are in
BENCHMARKS.md. Each harness is one module (``fleet.bench.queue`` for the queue) that returns a
pydantic report, so the CLI prints it as a table or as ``--json`` and tests assert its shape.
"""
