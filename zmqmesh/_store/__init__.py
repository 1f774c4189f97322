"""Layer 3, store: a node's durable store, one SQLite database behind a narrow interface
(append, acknowledge, pending, dead-letter, remember). All SQL lives in this package: the
durable queues in `store` (which opens the store), a publisher's kept topics in
`kept_topics`, durable subscriptions' cursors in `cursors`, a dedupe puller's ids in
`handled`, the tables in `schema`; `database` runs the transactions, `holds` keeps a
store to one node, `tools` serves the operator's commands."""
