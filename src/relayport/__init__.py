"""Relayport: event plumbing for SaaS backends."""

__version__ = "0.1.0"
