"""The engine: the pool, one request's life, resume triage, downloads."""
