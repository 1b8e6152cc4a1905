"""coordinator (see docs/architecture.md)."""
