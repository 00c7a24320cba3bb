"""Adapters for frameworks users already have (each behind its own extra)."""
