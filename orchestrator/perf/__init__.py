"""Performance benchmarks of the orchestrator's Ray components (run as modules, e.g.
`python -m orchestrator.perf.store_throughput`); not part of the test suite."""
