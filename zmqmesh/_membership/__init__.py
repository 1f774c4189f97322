"""Layer 4, membership: ZRE only. The engine (mailbox and state machine), links, the
failure detector, admission and control whispers. It reports `MembershipEvents` and
knows nothing of the patterns."""
