"""Layer 4, membership: ZRE only. `Membership` (engine.py) composes the mailbox, the
handling of each command, greeting, the peer table and its groups, liveness (driving the
failure detector), gossip, links, discovery, admission and control whispers. It reports
`MembershipEvents` and knows nothing of the patterns."""
