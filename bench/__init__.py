"""Benchmark of the magnesium-cds service: ``python -m bench`` (``--quick`` for a smoke run).

Deterministic FHIR workloads (``workloads``), in-process latency with per-stage timings
(``inprocess``), HTTP throughput under the production gunicorn configuration against a
minimal "floor" app (``http_load``, ``servers``, ``floor_app``), worker memory, and a profile
of the large workload. It prints tables and asserts nothing about time.
"""
