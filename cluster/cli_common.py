"""Flags and config building shared by the subcommands that run an engine (generate, worker)."""

from __future__ import annotations

import argparse


def engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory, or SmolLM2-135M-Instruct (the default; fetched on first use)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--no-packed-linear", dest="packed_linear", action="store_false",
                   help="CPU: multiply by the checkpoint's weights as loaded, not prepacked for oneDNN")
    p.add_argument("--kv-cache-memory", default=None, help="KV cache size, e.g. 512MiB or 2GiB")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--quantization", default="none", choices=["none", "int8"],
                   help="weight quantization of linear layers (int8: weight-only, per channel)")


def build_engine_config(args):
    from engine.config import CacheConfig, DeviceConfig, EngineConfig, SchedulerConfig, parse_size
    from engine.model_store import resolve_model

    model_dir = resolve_model(args.model)
    return EngineConfig(
        model=str(model_dir),
        cache=CacheConfig(block_size=args.block_size, kv_cache_memory=parse_size(args.kv_cache_memory),
                          enable_prefix_caching=not args.no_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_model_len=args.max_model_len),
        device=DeviceConfig(device=args.device, dtype=args.dtype, num_threads=args.threads,
                            packed_linear=getattr(args, "packed_linear", True)),
        quantization=args.quantization,
    )


def security_args(p: argparse.ArgumentParser) -> None:
    """CURVE for ZeroMQ and TLS/auth for etcd (docs/deploy.md). They are exported to the environment,
    so processes this one starts (ranks, a cluster's processes) use them too."""
    g = p.add_argument_group("security")
    g.add_argument("--curve-key", default=None, help="cluster CURVE secret key file (`cluster keys`): encrypt "
                   "and authenticate every ZeroMQ socket (also $TANDEM_CURVE_KEY)")
    g.add_argument("--etcd-ca", default=None, help="CA file for etcd's TLS certificates (also $TANDEM_ETCD_CA)")
    g.add_argument("--etcd-cert", default=None, help="client certificate for etcd (also $TANDEM_ETCD_CERT)")
    g.add_argument("--etcd-key", default=None, help="its key (also $TANDEM_ETCD_KEY)")
    g.add_argument("--etcd-user", default=None, help="etcd user (also $TANDEM_ETCD_USER)")
    g.add_argument("--etcd-password-file", default=None,
                   help="file with that user's password (also $TANDEM_ETCD_PASSWORD_FILE)")


def apply_security_args(args) -> None:
    """Flags win over the environment; the result is checked (missing files fail here, before any
    process starts) and exported."""
    import dataclasses

    from common import security
    from common.etcd.client import EtcdAuth
    if getattr(args, "curve_key", None):
        security.configure(args.curve_key)
    else:
        security.enabled()  # loads (and so checks) $TANDEM_CURVE_KEY when it is set
    flags = {f: getattr(args, f"etcd_{f}", None) for f in ("ca", "cert", "key", "user", "password_file")}
    auth = dataclasses.replace(EtcdAuth.from_env(), **{k: v for k, v in flags.items() if v})
    auth.check().export()
