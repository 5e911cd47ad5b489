"""Implementations of the worker's port (``workers.ports.DispatcherLink``)."""
