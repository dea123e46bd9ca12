"""Prefect flows: compose tasks only (see docs/architecture.md)."""
