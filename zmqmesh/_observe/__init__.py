"""Observability: Prometheus metric families and OpenTelemetry spans, made from what a node
counts and does."""
