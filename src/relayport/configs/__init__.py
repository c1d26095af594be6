"""Live configuration: versioned, schema-validated, encrypted configuration pushed to clients."""
