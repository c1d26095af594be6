"""Outbound webhooks: endpoints, event types, messages, signed delivery, retries and breakers."""
