"""The cluster file (DESIGN.md §9): one TOML document describing a cluster, decoded into typed structs.
Torch-free. Errors quote the bad value and where it is in the file:

    cluster.toml: pool[1].tp = 'two': expected `int`, got `str`

    name = "demo"                       # etcd prefix /tandem/demo/
    [etcd]
    endpoints = []                      # empty: `cluster up` starts an embedded etcd
    [model]
    path = "SmolLM2-135M-Instruct"      # a checkpoint directory, or the built-in default
    [slo]
    ttft_ms = 2000
    tpot_ms = 200
    [placement]
    policy = "slo"
    [gateway]
    port = 8000
    api_keys = []
    [[pool]]
    role = "prefill"
    replicas = 1
    [[pool]]
    role = "decode"
    replicas = 2
    tp = 1
    pp = 1
    hosts = ["gpu-a", "gpu-b"]          # replicas go round-robin over these hosts
    [hosts.gpu-a]
    address = "10.0.0.2"                # interface its processes bind to and advertise
    [security]
    curve_key = "keys/cluster.key_secret"   # ZeroMQ CURVE (`cluster keys`); etcd TLS: [etcd] ca/cert/key
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
import tomllib

from cluster.options import add_flags, by_name, engine_options

LOCAL = "local"
# engine options that are one per cluster, keys of [model]; every other one is a key of each [[pool]]
MODEL_WIDE = ("dtype", "quantization", "kv_cache_dtype", "speculative", "num_speculative_tokens", "draft_quantization")


class ConfigError(ValueError):
    pass


class Etcd(msgspec.Struct, forbid_unknown_fields=True):
    endpoints: list[str] = []
    host: str = LOCAL  # where `cluster up` runs the embedded etcd when no endpoints are given
    client_port: int = 0  # embedded: 0 = any free port (single host); set it for multi-host
    members: int = 1  # embedded: 3 runs a 3-member cluster on the etcd host (fault drills)
    # TLS and auth (common/etcd/client.py); paths are relative to the cluster file
    ca: str | None = None  # CA of the etcd certificates: turns TLS on
    cert: str | None = None  # client certificate (etcd --client-cert-auth) ...
    key: str | None = None  # ... and its key
    user: str | None = None  # etcd auth
    password_file: str | None = None
    server_cert: str | None = None  # embedded etcd with TLS: the member's certificate (SANs: its address)
    server_key: str | None = None


def _option_keys(model_wide: bool) -> list[tuple]:
    """The engine options' keys (cluster/options.py): name, type and default from engine/config.py."""
    return [(o.name, o.file_type, o.default) for o in engine_options() if (o.name in MODEL_WIDE) == model_wide]


# Model and Pool are made with defstruct: their engine keys come from the engine's structs
Model = msgspec.defstruct("Model", [
    ("path", str, "SmolLM2-135M-Instruct"),
    ("name", str | None, None),  # served model name (default: the directory's name)
    *_option_keys(model_wide=True),  # dtype, quantization, kv_cache_dtype
], module=__name__, forbid_unknown_fields=True)


class Slo(msgspec.Struct, forbid_unknown_fields=True):
    ttft_ms: float | None = None
    tpot_ms: float | None = None


class Placement(msgspec.Struct, forbid_unknown_fields=True):
    policy: Literal["slo", "least-loaded", "round-robin"] = "slo"
    suspect_after_s: float = 1.0
    kv_aware: bool = True  # false: the slo policy ignores the KV index (cache-blind; no local prefill)
    # conditional disaggregation: a decode worker prefills a request itself iff at most this many of its
    # tokens are left to compute there (the rest it holds); unset: the cost model decides; 0: never
    local_prefill_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    kv_bandwidth_gb_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0  # what KV pages move at between workers (placement's transfer time)


class Gateway(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = []
    replicas: int = 1
    hosts: list[str] = msgspec.field(default_factory=lambda: [LOCAL])
    max_migrations: int = 3
    migration_wait: float = 30.0  # seconds a moved request waits for a worker (SSE keep-alives meanwhile)


class Coordinator(msgspec.Struct, forbid_unknown_fields=True):
    admin_port: int = 8001
    replicas: int = 1
    hosts: list[str] = msgspec.field(default_factory=lambda: [LOCAL])


Pool = msgspec.defstruct("Pool", [
    ("role", Literal["prefill", "decode", "colocated"]),
    ("replicas", int, 1),
    ("hosts", list[str], msgspec.field(default_factory=lambda: [LOCAL])),  # replicas go round-robin over these
    *_option_keys(model_wide=False),  # tp, pp, device, threads, block_size, kv_cache_memory, kv_transport, ...
], module=__name__, forbid_unknown_fields=True)


class Security(msgspec.Struct, forbid_unknown_fields=True):
    curve_key: str | None = None  # cluster CURVE secret key file (`cluster keys`): every ZeroMQ socket


class Host(msgspec.Struct, forbid_unknown_fields=True):
    address: str = "127.0.0.1"


class ClusterSpec(msgspec.Struct, forbid_unknown_fields=True):
    name: str = "default"
    etcd: Etcd = msgspec.field(default_factory=Etcd)
    model: Model = msgspec.field(default_factory=Model)
    slo: Slo = msgspec.field(default_factory=Slo)
    placement: Placement = msgspec.field(default_factory=Placement)
    gateway: Gateway = msgspec.field(default_factory=Gateway)
    coordinator: Coordinator = msgspec.field(default_factory=Coordinator)
    pool: list[Pool] = msgspec.field(default_factory=lambda: [Pool("prefill"), Pool("decode")])
    hosts: dict[str, Host] = {}
    security: Security = msgspec.field(default_factory=Security)

    def address(self, host: str) -> str:
        return self.hosts[host].address if host in self.hosts else "127.0.0.1"

    def all_hosts(self) -> list[str]:
        names = {self.etcd.host, *self.gateway.hosts, *self.coordinator.hosts, *self.hosts}
        for p in self.pool:
            names.update(p.hosts)
        return sorted(names)

    def engine_values(self, pool: Pool) -> dict[str, Any]:
        """The engine option values of this pool's workers, by name: its keys and [model]'s."""
        return {o.name: getattr(self.model if o.name in MODEL_WIDE else pool, o.name) for o in engine_options()}


def error_location(e: msgspec.ValidationError) -> tuple[str, str]:
    """msgspec's errors carry their place in the text only: "Expected `int`, got `str` - at `$.pool[1].tp`".
    Returns the message and the place in our spelling, "pool[1].tp" ("" at the top level, where msgspec
    leaves the suffix out)."""
    what, sep, where = str(e).rpartition(" - at `$")
    if not sep:
        return str(e), ""
    return what, where.removesuffix("`").removeprefix(".")


def value_at(raw: Any, where: str) -> Any:
    """The value at a place like "pool[1].tp" in the decoded TOML, or KeyError. msgspec names a dict's
    key `[...]` (hosts[...].address), so there is no value to find past one."""
    cur = raw
    for part in where.replace("[", ".[").split("."):
        if not part:
            continue
        try:
            cur = cur[int(part[1:-1])] if part.startswith("[") else cur[part]
        except (IndexError, TypeError, ValueError):
            raise KeyError(where) from None
    return cur


def loads(text: str, source: str = "cluster.toml") -> ClusterSpec:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    try:
        spec = msgspec.convert(raw, ClusterSpec)
    except msgspec.ValidationError as e:
        what, where = error_location(e)
        if what.startswith("Object contains unknown field `"):
            name = what.split("`")[1]
            raise ConfigError(f"{source}: {where or '(top level)'}: unknown field {name!r}") from None
        at = where or "(top level)"
        if where:
            with contextlib.suppress(KeyError):
                at = f"{where} = {value_at(raw, where)!r}"
        raise ConfigError(f"{source}: {at}: {what[0].lower() + what[1:]}") from None
    _check(spec, raw, source)
    return spec


PATH_FIELDS = (("etcd", ("ca", "cert", "key", "password_file", "server_cert", "server_key")),
               ("security", ("curve_key",)))


def load(path: str | Path) -> ClusterSpec:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot be read ({e.strerror})") from None
    spec = loads(text, str(p))
    for table, fields in PATH_FIELDS:  # file paths in the file are relative to it
        section = getattr(spec, table)
        for f in fields:
            v = getattr(section, f)
            if v and not Path(v).expanduser().is_absolute():
                setattr(section, f, str((p.parent / v).resolve()))
            elif v:
                setattr(section, f, str(Path(v).expanduser()))
    return spec


def _check(spec: ClusterSpec, raw: dict, source: str) -> None:
    def bad(where: str, value, why: str):
        raise ConfigError(f"{source}: {where} = {value!r}: {why}")

    if not spec.name or "/" in spec.name:
        bad("name", spec.name, "must be non-empty and contain no '/'")
    roles = set()
    for i, p in enumerate(spec.pool):
        for field in ("replicas", "tp", "pp", "threads"):
            v = getattr(p, field)
            if v < (0 if field == "replicas" else 1):
                bad(f"pool[{i}].{field}", v, "must be a positive integer" if field != "replicas" else "must be >= 0")
        if not p.hosts:
            bad(f"pool[{i}].hosts", p.hosts, "needs at least one host")
        if p.kv_transport == "nccl" and not p.device.startswith("cuda"):
            bad(f"pool[{i}].kv_transport", p.kv_transport, f"needs a CUDA device (pool[{i}].device = {p.device!r})")
        if p.replicas:
            roles.add(p.role)
    for where, hosts in (("gateway.hosts", spec.gateway.hosts), ("coordinator.hosts", spec.coordinator.hosts)):
        if not hosts:
            bad(where, hosts, "needs at least one host")
    if not ("colocated" in roles or {"prefill", "decode"} <= roles):
        bad("pool", [p.role for p in spec.pool if p.replicas],
            "needs a prefill and a decode pool with replicas (or a colocated one)")
    for where, v in (("gateway.port", spec.gateway.port), ("coordinator.admin_port", spec.coordinator.admin_port),
                     ("etcd.client_port", spec.etcd.client_port)):
        if not 0 <= v <= 65535:
            bad(where, v, "must be a port number (0: any free port)")
    if spec.etcd.members not in (1, 3, 5):
        bad("etcd.members", spec.etcd.members, "must be 1, 3 or 5")
    if spec.etcd.members > 1 and spec.etcd.client_port:
        bad("etcd.client_port", spec.etcd.client_port, "a multi-member embedded etcd picks free ports (single host)")
    for where, v in (("gateway.replicas", spec.gateway.replicas), ("coordinator.replicas", spec.coordinator.replicas)):
        if v < 1:
            bad(where, v, "must be >= 1")
    for where, v in (("slo.ttft_ms", spec.slo.ttft_ms), ("slo.tpot_ms", spec.slo.tpot_ms)):
        if v is not None and v <= 0:
            bad(where, v, "must be > 0 (or absent: no SLO)")
    for h in spec.all_hosts():
        if h != LOCAL and h not in spec.hosts:
            raise ConfigError(f"{source}: host {h!r} is used but has no [hosts.{h}] table with its address")
    e = spec.etcd
    if bool(e.server_cert) != bool(e.server_key) or (e.server_cert and not e.ca):
        bad("etcd.server_cert", e.server_cert, "an embedded etcd with TLS needs server_cert, server_key and ca")
    if e.server_cert and e.endpoints:
        bad("etcd.server_cert", e.server_cert, "is for the embedded etcd; with etcd.endpoints, TLS is the server's")
    if bool(e.cert) != bool(e.key):
        bad("etcd.cert", e.cert, "a client certificate needs its key (etcd.key) too")
    if bool(e.user) != bool(e.password_file):
        bad("etcd.user", e.user, "etcd auth needs both user and password_file")
    if len(spec.all_hosts()) > 1 and not spec.etcd.endpoints and not spec.etcd.client_port:
        bad("etcd.client_port", 0, "a multi-host cluster with an embedded etcd needs a fixed port (or etcd.endpoints)")


class KeyFlag(NamedTuple):
    """A `cluster up` flag that sets a key of the cluster file, over the file's value; its type is the key's."""

    flag: str
    key: str  # "gateway.port"
    help: str | None = None
    comma: bool = False  # a list key: comma-separated in one flag (else the flag repeats)


KEY_FLAGS = (
    KeyFlag("--cluster", "name", "cluster name (default: the file's, or 'default')"),
    KeyFlag("--etcd", "etcd.endpoints", "use this etcd (comma-separated endpoints) instead of an embedded one",
            comma=True),
    KeyFlag("--model", "model.path", "checkpoint directory (default: SmolLM2-135M-Instruct)"),
    KeyFlag("--gateway-host", "gateway.host", "gateway interface (default 127.0.0.1)"),
    KeyFlag("--port", "gateway.port", "gateway port (default 8000; 0: any free port)"),
    KeyFlag("--admin-port", "coordinator.admin_port", "coordinator admin API port (default 8001)"),
    KeyFlag("--policy", "placement.policy"),
    KeyFlag("--api-key", "gateway.api_keys", "require this Bearer key at the gateway (repeatable)"),
)
POOL_FLAGS = ("threads", "kv_cache_memory")  # engine options `cluster up` sets for every pool


def _comma_list(text: str) -> list[str]:
    return text.split(",")


def add_key_flags(parser: argparse.ArgumentParser) -> None:
    """KEY_FLAGS and POOL_FLAGS on `cluster up`: not given, each is None (the file's value stands)."""
    for f in KEY_FLAGS:
        *tables, name = f.key.split(".")
        cls = functools.reduce(lambda c, t: typing.get_type_hints(c)[t], tables, ClusterSpec)
        typ = typing.get_type_hints(cls)[name]
        if typing.get_origin(typ) is list:
            kind = {"type": _comma_list} if f.comma else {"action": "append"}
        elif typing.get_origin(typ) is Literal:
            kind = {"choices": typing.get_args(typ)}
        else:
            kind = {"type": typ} if typ is not str else {}
        parser.add_argument(f.flag, default=None, help=f.help, **kind)
    add_flags(parser, by_name(*POOL_FLAGS), override=True)


def apply_key_flags(spec: ClusterSpec, args: argparse.Namespace) -> None:
    """The values add_key_flags' flags were given, set on the spec (an empty string counts as not given)."""
    def given(dest: str) -> Any:
        v = getattr(args, dest)
        return None if v == "" else v

    for f in KEY_FLAGS:
        if (v := given(f.flag.removeprefix("--").replace("-", "_"))) is not None:
            *tables, name = f.key.split(".")
            setattr(functools.reduce(getattr, tables, spec), name, v)
    for name in POOL_FLAGS:
        if (v := given(name)) is not None:
            for p in spec.pool:
                setattr(p, name, v)


def placements(spec: ClusterSpec) -> list[dict]:
    """Every process of the cluster: {name, kind, host, ...}; replicas go round-robin over their hosts."""
    out = []
    for i in range(spec.coordinator.replicas):
        out.append({"name": f"coordinator-{i}", "kind": "coordinator",
                    "host": spec.coordinator.hosts[i % len(spec.coordinator.hosts)]})
    count: dict[str, int] = {}
    for p in spec.pool:
        for i in range(p.replicas):
            n = count.get(p.role, 0)
            count[p.role] = n + 1
            out.append({"name": f"{p.role}-{n}", "kind": "worker", "host": p.hosts[i % len(p.hosts)], "pool": p})
    for i in range(spec.gateway.replicas):
        out.append({"name": f"gateway-{i}", "kind": "gateway", "host": spec.gateway.hosts[i % len(spec.gateway.hosts)]})
    return out
