"""kvtransfer (see docs/architecture.md)."""
