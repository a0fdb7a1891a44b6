"""Manifests: jobs, line shapes, validation, and the JSONL / text / CSV readers."""
