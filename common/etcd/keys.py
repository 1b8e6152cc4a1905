"""The etcd key schema (DESIGN.md §5, docs/etcd.md): every key lives under /tandem/<cluster>/."""

from __future__ import annotations


def root(cluster: str) -> str:
    if not cluster or "/" in cluster:
        raise ValueError(f"cluster name {cluster!r}: must be non-empty and contain no '/'")
    return f"/tandem/{cluster}/"


def workers(cluster: str) -> str:
    return root(cluster) + "workers/"


def worker(cluster: str, role: str, worker_id: str) -> str:
    return f"{workers(cluster)}{role}/{worker_id}"


def worker_id_of(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def coordinators(cluster: str) -> str:
    return root(cluster) + "coordinators/"


def coordinator(cluster: str, coordinator_id: str) -> str:
    return coordinators(cluster) + coordinator_id


def leader(cluster: str) -> str:
    return root(cluster) + "coordinator/leader"


def drains(cluster: str) -> str:
    return root(cluster) + "drain/"


def drain(cluster: str, worker_id: str) -> str:
    return drains(cluster) + worker_id


def gateways(cluster: str) -> str:
    return root(cluster) + "gateways/"


def gateway(cluster: str, gateway_id: str) -> str:
    return gateways(cluster) + gateway_id


def profiles(cluster: str) -> str:
    return root(cluster) + "profiles/"


def profile(cluster: str, model: str, shape: str) -> str:
    return profiles(cluster) + f"{model}/{shape}"


def spec(cluster: str) -> str:
    return root(cluster) + "spec"
