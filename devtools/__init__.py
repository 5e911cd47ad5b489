"""Development tools, outside the installed product: the demo and local stand-ins for the
outside services the dispatcher talks to, for tests and demos.

- ``python -m devtools.demo`` (``make demo``): the product end to end on this machine;
- ``devtools.idp``, ``devtools.vaults``: small HTTPS servers on 127.0.0.1 speaking the real
  service's API shape (an Entra-shaped identity provider, Azure Key Vault, CyberArk CCP), with
  switchable failures, request counters and an admin API (``/_admin/...``) so that another
  process can drive them.

Never use them in production: they keep everything in memory and sign nothing. The package is
not part of the ``rundispatch`` distribution (see ``pyproject.toml``).
"""
