"""The OpenAI-compatible HTTP gateway (torch-free): the API surface, each request's generations, the
link to the coordinators, and migration off failed workers (docs/gateway.md)."""
