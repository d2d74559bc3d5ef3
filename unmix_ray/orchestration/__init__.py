"""The orchestration layer: sweeps on Ray Tune (``sweep``, ``trial``), MLflow runs (``tracking``), the
results table (``results``, ``stats``, ``render``) and its pictures (``plots``), and the plan of a sweep
with its resources and cost (``plan``, ``resources``, ``throughput``)."""
