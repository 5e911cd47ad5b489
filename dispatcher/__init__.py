"""rundispatch: a run dispatcher for desktop flows.

Cloud flows publish run requests to RabbitMQ; the dispatcher admits them, queues them per
target, selects a machine, and hands each run to that machine's worker. State lives in Redis.
"""

__version__ = "0.1.0"
