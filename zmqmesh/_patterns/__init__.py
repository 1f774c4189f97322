"""Layer 6, patterns: pub/sub, pipeline (with both halves of at-least-once), request/reply
(sans-I/O plan and replies), and inbound dispatch. Each takes its collaborators
explicitly (loop, directory, stats, a connect function), never the engine."""
