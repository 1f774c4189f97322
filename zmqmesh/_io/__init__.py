"""Layer 2, io: the event-loop protocol and the `Reactor`, socket helpers (options in one
place), UDP beacons, network interfaces, CURVE and the ZAP handler, and what a forked child lets
go of (`inherited`, `serving`)."""
