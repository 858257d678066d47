"""Session runners: one mailbox actor per session, and the host that routes to them."""
