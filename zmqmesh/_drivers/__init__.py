"""Layer 8, drivers: how the plans wait. `thread` blocks threads (the sync `Node`), `aio`
awaits (the `AsyncNode`); they differ in nothing else. The engine never imports them:
the node facades hand their factories to it."""
