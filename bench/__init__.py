"""Benchmark of the magnesium-cds service: ``python -m bench`` (``--quick`` for a smoke run).

Deterministic FHIR workloads (``workloads``); the service in process (``inprocess``) and over
its real-world corpus (``corpus``); a fresh worker's first call (``fresh``); HTTP load on
``cds-service serve`` and on the minimal "floor" app (``http_load``, ``servers``,
``floor_app``); the targets, ratios judged within one run (``targets``).
"""
