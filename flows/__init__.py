"""Prefect flows: compose tasks only (see ARCHITECTURE.md)."""
