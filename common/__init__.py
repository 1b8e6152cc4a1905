"""The ground floor every service stands on (torch-free): the wire messages and their one envelope,
security (CURVE), the ZeroMQ loop, the registry schema, heartbeats, the worker agent and the etcd
session, keys and watches. It imports no other package of ours (docs/architecture.md)."""
