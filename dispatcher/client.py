"""The Python client's public import path: ``from dispatcher.client import Client``.

The client itself lives with the other tools in :mod:`dispatcher.tools.client`.
"""

from dispatcher.tools.client import Client, QueueEntry

__all__ = ["Client", "QueueEntry"]
