"""Identity: passwords, JWT access tokens, rotating refresh tokens, API keys, roles."""
