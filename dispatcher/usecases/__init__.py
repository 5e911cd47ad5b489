"""The use cases: what the dispatcher does with the core's decisions, through small ports
(``ports.py``) and typed results (``results.py``); every change of a run goes through the
lifecycle (``lifecycle.py``). No use case imports an adapter."""
