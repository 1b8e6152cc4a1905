"""prefill (see docs/architecture.md)."""
