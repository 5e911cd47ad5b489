"""The independent minimal baseline and the raw stack loop.

Nothing here imports the product (``dispatcher``, ``workers``) or the parts of the bench that
do; ``tests/unit/test_minimal_imports.py`` checks it. These are what this stack can do on
this machine, not what our design does:

* ``minimal``: the least work a fenced hand-off needs. A request is consumed, one Lua call
  admits and claims a whole batch of runs (fence, machine, request kept in Redis), the
  assignments are published to the machines' queues with confirms, the requests acked; a
  worker consumes its assignments, one Lua call starts and finishes a whole batch under its
  fences, the outcomes are published with confirms, the assignments acked; the dispatcher
  consumes the outcomes and acks them.
* ``stack``: one hop, the raw loop: consume, one Redis pipeline, confirmed publish, ack.

``python -m bench.minimal --help`` runs either on its own; ``python -m bench`` runs them as
its ``minimal`` and ``stack`` sections.
"""
