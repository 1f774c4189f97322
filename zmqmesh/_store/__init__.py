"""Layer 3, store: a node's durable store, one SQLite database behind a narrow interface
(append, acknowledge, pending, dead-letter, remember). All SQL lives in `sqlite`."""
