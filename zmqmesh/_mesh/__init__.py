"""Layer 5, mesh: the registry of handlers, the directory of who offers what (provider
choice and retry policy), and the waiters callers block or await on."""
