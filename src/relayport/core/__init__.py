"""The Relayport platform core: imports no capability module."""
