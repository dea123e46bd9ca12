"""Units of work: plain functions first, Prefect tasks second (see docs/architecture.md)."""
