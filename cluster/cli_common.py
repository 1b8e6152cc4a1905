"""Flags and config building shared by the subcommands that run an engine (generate, worker)."""

from __future__ import annotations

import argparse

from cluster.options import add_flags, engine_config, engine_options, given


def engine_args(p: argparse.ArgumentParser, worker: bool = False) -> None:
    """--model and a flag per engine option (cluster/options.py); `worker`: with the worker-only ones."""
    p.add_argument("--model", default=None,
                   help="checkpoint directory, or SmolLM2-135M-Instruct (the default; fetched on first use)")
    add_flags(p, engine_options(worker))


def build_engine_config(args):
    from engine.model_store import resolve_model

    return engine_config(str(resolve_model(args.model)), given(args))


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
