"""How this process reaches etcd: plain, TLS (server-verified, optionally with a client certificate),
and etcd's user/password auth. Torch-free.

Settings travel in the environment so every process of a cluster (and every process those start)
uses the same ones, like etcdctl's ETCDCTL_* variables; the CLI's `--etcd-ca`/`--etcd-cert`/
`--etcd-key`/`--etcd-user`/`--etcd-password-file` and the cluster file's [etcd] table set them:

    TANDEM_ETCD_CA             CA bundle that signed the etcd servers' certificates (turns TLS on)
    TANDEM_ETCD_CERT, _KEY     client certificate and key (etcd --client-cert-auth)
    TANDEM_ETCD_USER           etcd user (auth enabled on the server)
    TANDEM_ETCD_PASSWORD_FILE  file holding that user's password (never a flag: it would show in ps)

An `https://` endpoint also turns TLS on (with the system's CA bundle when no CA is given).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import aetcd
from aetcd import rpc, watcher

ENV = {"ca": "TANDEM_ETCD_CA", "cert": "TANDEM_ETCD_CERT", "key": "TANDEM_ETCD_KEY",
       "user": "TANDEM_ETCD_USER", "password_file": "TANDEM_ETCD_PASSWORD_FILE"}


class EtcdConfigError(ValueError):
    """A TLS or auth setting that cannot work (a missing file, a key without its certificate)."""


@dataclass(frozen=True)
class EtcdAuth:
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password_file: str | None = None

    @classmethod
    def from_env(cls) -> EtcdAuth:
        return cls(**{f: os.environ.get(var) or None for f, var in ENV.items()})

    def export(self) -> None:
        """Puts these settings in this process's environment (inherited by what it starts)."""
        for f, var in ENV.items():
            v = getattr(self, f)
            if v:
                os.environ[var] = os.path.abspath(v) if f != "user" else v
            else:
                os.environ.pop(var, None)

    def check(self) -> EtcdAuth:
        for f in ("ca", "cert", "key", "password_file"):
            v = getattr(self, f)
            if v and not Path(v).is_file():
                raise EtcdConfigError(f"etcd {f.replace('_', ' ')} file {v} does not exist")
        if bool(self.cert) != bool(self.key):
            raise EtcdConfigError("etcd client TLS needs both a certificate and its key")
        if bool(self.user) != bool(self.password_file):
            raise EtcdConfigError("etcd auth needs both a user and a password file")
        return self

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert)

    def password(self) -> str | None:
        if not self.password_file:
            return None
        return Path(self.password_file).read_text().strip()

    def credentials(self):
        import grpc

        def read(p):
            return Path(p).read_bytes() if p else None
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


class TLSClient(aetcd.Client):
    """aetcd 1.0's Client opens only insecure channels: this one opens a TLS channel and otherwise
    connects as `aetcd.Client.connect` does (stubs, auth token, watcher)."""

    def __init__(self, host: str, port: int, credentials, **kw):
        super().__init__(host, port, **kw)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            self.channel = rpc.secure_channel(f"{self._host}:{self._port}", self._credentials,
                                              options=self._options.items())
            if self._username is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                resp = await self.auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout)
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                            metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False


# gRPC channels to one address share their subchannels, and with them a reconnect backoff that grows
# to 2 minutes while etcd is down: a session's fresh client would then wait out that backoff after
# etcd is back. Own subchannels and a short backoff: reconnected within about a second.
CHANNEL_OPTIONS = {"grpc.use_local_subchannel_pool": 1, "grpc.initial_reconnect_backoff_ms": 100,
                   "grpc.min_reconnect_backoff_ms": 100, "grpc.max_reconnect_backoff_ms": 1000}


def make_client(endpoint, auth: EtcdAuth, timeout: float) -> aetcd.Client:
    """An unconnected client for one endpoint (a parsed URL)."""
    kw = {"timeout": int(timeout) or 1, "username": auth.user, "password": auth.password(),
          "options": dict(CHANNEL_OPTIONS)}
    port = endpoint.port or 2379
    if auth.tls or endpoint.scheme == "https":
        return TLSClient(endpoint.hostname, port, auth.credentials(), **kw)
    return aetcd.Client(endpoint.hostname, port, **kw)
