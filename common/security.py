"""ZeroMQ CURVE for the cluster's internal sockets (multi-host clusters on untrusted networks).

One cluster keypair, made by `cluster keys --out DIR`, is the credential: every process that holds
the secret key file may join. Sockets that bind are CURVE servers with that key; sockets that
connect are CURVE clients presenting the same keypair, and a ZAP handler on each context admits
only clients that prove they hold it. So traffic is encrypted and a peer without the file can
neither read nor inject anything (its handshake is refused before a message is delivered).

Configuration is process-wide and inherited: `TANDEM_CURVE_KEY=/path/cluster.key_secret` in the
environment (the CLI's `--curve-key` and the cluster file's `[security] curve_key` set it), so the
follower ranks a worker spawns pick it up too. Unset, `server()` and `client()` are no-ops.

Every socket in the cluster calls `server(sock)` before `bind` or `client(sock)` before `connect`.
torch.distributed traffic (TP/PP collectives on one host, the NCCL/gloo KV path) is not covered:
run those on a trusted fabric, as NCCL itself assumes.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path

import zmq
import zmq.auth

ENV = "TANDEM_CURVE_KEY"
log = logging.getLogger(__name__)


class SecurityError(ValueError):
    """A key file that is missing, malformed or readable by others."""


class _Curve:
    def __init__(self, public: bytes, secret: bytes):
        self.public, self.secret = public, secret
        self._auth: dict[int, object] = {}  # id(context) -> its ZAP authenticator
        self._lock = threading.Lock()

    def callback(self, domain: str, client_key: bytes) -> bool:  # the ZAP credentials provider
        return client_key == self.public

    def authenticate(self, ctx: zmq.Context) -> None:
        with self._lock:
            if id(ctx) in self._auth:
                return
            from zmq.auth.thread import ThreadAuthenticator
            auth = ThreadAuthenticator(ctx, log=logging.getLogger("tandem.zap"))
            auth.start()
            auth.configure_curve_callback("*", credentials_provider=self)
            self._auth[id(ctx)] = auth


_lock = threading.Lock()
_curve: _Curve | None = None
_loaded_from: str | None = None


def load_keypair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a `cluster keys` secret file; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise SecurityError(f"CURVE key file {p} does not exist (make one with `cluster keys --out DIR`)")
    mode = p.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(f"CURVE key file {p} is readable by other users (mode {oct(mode & 0o777)}); "
                            f"chmod 600 it")
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (ValueError, OSError) as e:
        raise SecurityError(f"CURVE key file {p}: {e}") from None
    if not secret:
        raise SecurityError(f"CURVE key file {p} holds no secret key (use the .key_secret file)")
    return public, secret


def make_keys(out_dir: str | os.PathLike, name: str = "cluster") -> Path:
    """Writes a new cluster keypair; returns the secret file (mode 600) to hand to every process."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    secret = d / f"{name}.key_secret"
    if secret.exists():
        raise SecurityError(f"{secret} exists already: refusing to overwrite a cluster key")
    old = os.umask(0o077)
    try:
        _, secret_file = zmq.auth.create_certificates(d, name)
    finally:
        os.umask(old)
    os.chmod(secret_file, 0o600)
    return Path(secret_file)


def configure(path: str | os.PathLike | None) -> None:
    """Turns CURVE on for this process and its children (None: off)."""
    global _curve, _loaded_from
    with _lock:
        if path is None:
            os.environ.pop(ENV, None)
            _curve, _loaded_from = None, None
            return
        path = os.path.abspath(path)
        public, secret = load_keypair(path)
        os.environ[ENV] = path
        _curve, _loaded_from = _Curve(public, secret), path


def _current() -> _Curve | None:
    path = os.environ.get(ENV) or None
    if path != _loaded_from:
        configure(path)
    return _curve


def enabled() -> bool:
    return _current() is not None


def server(sock: zmq.Socket) -> zmq.Socket:
    """Call before `bind`: the socket accepts only CURVE clients holding the cluster key."""
    c = _current()
    if c is not None:
        c.authenticate(sock.context)
        sock.curve_secretkey = c.secret
        sock.curve_publickey = c.public
        sock.curve_server = True
    return sock


def client(sock: zmq.Socket) -> zmq.Socket:
    """Call before `connect`: the socket speaks CURVE to cluster servers."""
    c = _current()
    if c is not None:
        sock.curve_secretkey = c.secret
        sock.curve_publickey = c.public
        sock.curve_serverkey = c.public
    return sock
