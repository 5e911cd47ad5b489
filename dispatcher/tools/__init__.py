"""Tools for people and programs: the CLI (``python -m dispatcher``), the Python client, the
sign-in commands and fleet files. Like the composition root, they build their own adapters."""
