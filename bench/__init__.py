"""Benchmark of the magnesium-cds service: ``python -m bench`` (``--quick`` for a smoke run).

``workloads``: the hook calls, built from the fixture patients; ``servers``: the servers it
starts and loads over HTTP; ``floor_app``: the least a service can do per call; ``__main__``:
the runs, their tables and the targets. See docs/performance.md.
"""
