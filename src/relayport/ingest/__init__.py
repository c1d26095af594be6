"""Inbound webhooks: provider signature verification, normalization into CloudEvents, ingestion."""
