"""The KV bank: snapshots in host RAM and a durable tier, used by the slot engine."""
