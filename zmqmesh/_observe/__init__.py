"""Observability: Prometheus metrics (and, later, traces) made from what a node counts."""
