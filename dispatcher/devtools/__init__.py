"""Local stand-ins for the outside services the dispatcher talks to, for tests and demos.

Each one is a small HTTPS server on 127.0.0.1 speaking the real service's API shape (an
Entra-shaped identity provider, Azure Key Vault, CyberArk CCP), with switchable failures,
request counters and an admin API (``/_admin/...``) so that another process can drive it.
Never use them in production: they keep everything in memory and sign nothing.
"""
