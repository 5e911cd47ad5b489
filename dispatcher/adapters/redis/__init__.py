"""Redis: the run store (scripts, codec, replies, transitions, reads), live machine state, the
fleet, leases, the outbox stream and the queue-state gauges."""
