"""`cluster up` on one host: an embedded etcd, a coordinator, prefill and decode workers and a
gateway, each a child process with its own log file, supervised in the foreground (a child that exits
unexpectedly is restarted with backoff) until Ctrl-C or SIGTERM stops them all, in order. With
`--detach` the supervisor runs in the background and `state.json` in the state directory names it and
every child, for `cluster status`, `cluster logs` and `cluster down` (cluster/ops.py). Torch-free.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cluster.config import LOCAL, ClusterSpec, Pool, apply_key_flags, load, placements
from cluster.etcd_server import EtcdServer, ServerTLS, free_port, start_cluster
from cluster.ops import default_state_dir
from cluster.options import to_argv
from common import security
from common.etcd.client import EtcdAuth


def placement_args(spec: ClusterSpec) -> list[str]:
    """`cluster coordinator` flags for the cluster file's [placement] table."""
    pl = spec.placement
    args = ["--policy", pl.policy, "--suspect-after", str(pl.suspect_after_s),
            "--kv-bandwidth-gb-s", str(pl.kv_bandwidth_gb_s)]
    args += [] if pl.kv_aware else ["--no-kv-aware"]
    args += [f"--local-prefill-tokens={pl.local_prefill_tokens}"] if pl.local_prefill_tokens is not None else []
    return args


@dataclass
class Child:
    name: str
    args: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0
    ready_by: float = 0.0  # a restart in progress: when to give up waiting for its ready line

    def start(self, wait_ready: bool = True, timeout: float = 300.0) -> None:
        out = open(self.log, "a")  # noqa: SIM115 (the child holds it)
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(self.args)}\n")
        out.flush()
        self.proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", *self.args], stdout=subprocess.PIPE,
                                     stderr=out, text=True, start_new_session=True)
        out.close()
        self.started_at = time.monotonic()
        if wait_ready:
            self.wait_ready(timeout)

    def poll_ready(self) -> bool:
        """Non-blocking: True once the child has printed its ready line."""
        import select
        while select.select([self.proc.stdout], [], [], 0)[0]:
            line = self.proc.stdout.readline()
            if not line:
                return False
            if line.startswith("{"):
                self.info = json.loads(line)
                return True
        return False

    def wait_ready(self, timeout: float) -> None:
        import select
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if r:
                line = self.proc.stdout.readline()
                if line.startswith("{"):
                    self.info = json.loads(line)
                    return
                if not line:
                    break
            elif self.proc.poll() is not None:
                break
        raise RuntimeError(f"{self.name} did not start; see {self.log}:\n{self.log.read_text()[-2000:]}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the worker's rank processes too
            self.proc.wait(5)


def spec_from_args(args) -> ClusterSpec:
    """The cluster file (or the single-host default), with command-line flags on top."""
    spec = load(args.file) if args.file else ClusterSpec()
    for role, n in (("prefill", args.prefill), ("decode", args.decode)):
        if n is not None:
            pools = [p for p in spec.pool if p.role == role]
            if pools:
                pools[0].replicas = n
            else:
                spec.pool.append(Pool(role, replicas=n))
    apply_key_flags(spec, args)  # after the pools are made: --threads and --kv-cache-memory set every one
    return spec


class Supervisor:
    def __init__(self, args):
        self.a = args
        self.spec = spec_from_args(args)
        self.host = args.node or LOCAL
        args.cluster = self.spec.name
        self.state_dir = Path(args.state_dir) if args.state_dir else default_state_dir(self.spec.name)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        self.etcds: list[EtcdServer] = []
        self._etcd_restart: dict[int, float] = {}
        self.children: list[Child] = []
        self._stop = False

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def _child(self, name: str, args: list[str]) -> Child:
        c = Child(name, args, self.state_dir / "logs" / f"{name}.log")
        self.children.append(c)
        return c

    def start(self) -> None:
        from engine.model_store import resolve_model
        spec, me = self.spec, self.host
        mine = [p for p in placements(spec) if p["host"] == me]
        embedded = not spec.etcd.endpoints and spec.etcd.host == me
        if not mine and not embedded:
            raise RuntimeError(f"nothing in the cluster file runs on host {me!r} "
                               f"(hosts: {', '.join(spec.all_hosts())}; pick one with --host)")
        model = spec.model.path
        if any(p["kind"] != "coordinator" for p in mine):
            model = str(resolve_model(spec.model.path))  # fetched and converted on first use (progress bar)
        addr = spec.address(me)
        etcd_eps = ",".join(spec.etcd.endpoints)
        tls = self._secure()
        if embedded:  # a fresh member each time (the cluster's state lives with its processes)
            import shutil
            shutil.rmtree(self.state_dir / "etcd", ignore_errors=True)
            if spec.etcd.members > 1:
                self.etcds = start_cluster(spec.etcd.members, self.state_dir / "etcd", tls=tls)
            else:
                self.etcds = [EtcdServer.start(self.state_dir / "etcd", host=addr, peer_port=free_port(addr),
                                               client_port=spec.etcd.client_port or free_port(addr), tls=tls)]
            etcd_eps = ",".join(e.endpoint for e in self.etcds)
            for e in self.etcds:
                self.log(f"{e.name:<11} pid {e.proc.pid:<7} {e.endpoint}  (data in {e.data_dir})")
        elif not etcd_eps:
            host = spec.address(spec.etcd.host)
            etcd_eps = f"{'https' if spec.etcd.ca else 'http'}://{host}:{spec.etcd.client_port}"
        self.etcd_endpoints = etcd_eps
        common = ["--etcd", etcd_eps, "--cluster", spec.name]
        served = ["--served-model-name", spec.model.name] if spec.model.name else []
        admin_host = "127.0.0.1" if me == LOCAL else addr
        n_coord = n_gw = 0
        for p in mine:
            if p["kind"] == "coordinator":
                port = spec.coordinator.admin_port if n_coord == 0 else 0
                n_coord += 1
                args = ["coordinator", *common, "--id", p["name"], "--host", addr, "--admin-host", admin_host,
                        "--admin-port", str(port), *placement_args(spec)]
                args += [f"--ttft-ms={spec.slo.ttft_ms}"] if spec.slo.ttft_ms else []
                args += [f"--tpot-ms={spec.slo.tpot_ms}"] if spec.slo.tpot_ms else []
                self._child(p["name"], args)
            elif p["kind"] == "worker":
                pool = p["pool"]
                self._child(p["name"], ["worker", "--role", pool.role, "--worker-id", p["name"], "--model", model,
                                        *common, *served, "--host", addr, *to_argv(spec.engine_values(pool))])
        coords = [c for c in self.children if c.args[0] == "coordinator"]
        for c in coords:
            c.start()
        workers = [c for c in self.children if c.args[0] == "worker"]
        for c in workers:  # workers load in parallel
            c.start(wait_ready=False)
        for c in workers:
            c.wait_ready(900)
        for p in mine:
            if p["kind"] == "gateway":
                port = spec.gateway.port + n_gw if spec.gateway.port else 0
                n_gw += 1
                gw = self._child(p["name"], ["gateway", *common, "--model", model, *served, "--port", str(port),
                                             "--host", spec.gateway.host, "--internal-host", addr, "--id", p["name"],
                                             "--max-migrations", str(spec.gateway.max_migrations),
                                             "--migration-wait", str(spec.gateway.migration_wait)]
                                 + [f"--api-key={k}" for k in spec.gateway.api_keys])
                gw.start()
        gateways = [c for c in self.children if c.args[0] == "gateway"]
        self.url = gateways[0].info["url"] if gateways else ""
        for gw in gateways:
            self._wait_ready(gw.info["url"], timeout=600 if me != LOCAL else 60)
        for c in self.children:
            where = c.info.get("url") or c.info.get("admin") or c.info.get("endpoint", "")
            self.log(f"{c.name:<11} pid {c.pid:<7} {where}")
        admin = coords[0].info["admin"] if coords else ""
        if self.url:
            self.log(f"serving {gateways[0].info.get('model')} at {self.url}/v1"
                     + (f" (admin API {admin})" if admin else "") + f"; logs in {self.state_dir / 'logs'}")
        else:
            self.log(f"host {me} is up; logs in {self.state_dir / 'logs'}")
        self._write_state(etcd_eps, admin)

    def _secure(self) -> ServerTLS | None:
        """CURVE and etcd TLS/auth from the cluster file, unless flags or the environment set them;
        exported, so every process started from here uses them. Returns the embedded etcd's TLS."""
        e = self.spec.etcd
        if self.spec.security.curve_key and not security.enabled():
            security.configure(self.spec.security.curve_key)
        env = EtcdAuth.from_env()
        cert, key = (e.cert, e.key) if e.cert else (e.server_cert, e.server_key)  # a member cert may serve
        EtcdAuth(env.ca or e.ca, env.cert or cert, env.key or key, env.user or e.user,
                 env.password_file or e.password_file).check().export()
        return ServerTLS(e.server_cert, e.server_key, e.ca) if e.server_cert else None

    def _wait_ready(self, url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the gateway at {url} did not become ready")

    def _write_state(self, etcd_eps: str, admin: str) -> None:
        state = {"cluster": self.spec.name, "host": self.host, "supervisor_pid": os.getpid(), "url": self.url, "admin": admin,
                 "etcd": etcd_eps, "etcd_pid": self.etcds[0].proc.pid if self.etcds else None,
                 "etcd_members": [{"name": e.name, "pid": e.proc.pid, "endpoint": e.endpoint} for e in self.etcds],
                 "gateways": [c.info.get("url") for c in self.children if c.args[0] == "gateway" and c.info],
                 "admins": [c.info.get("admin") for c in self.children if c.args[0] == "coordinator" and c.info],
                 "children": {c.name: {"pid": c.pid, "log": str(c.log),
                                       "url": c.info.get("url") or c.info.get("admin") or c.info.get("endpoint")}
                              for c in self.children}}
        tmp = self.state_dir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_dir / "state.json")

    def supervise(self) -> None:
        """Restarts a child that exits unexpectedly, with backoff (1 s doubling to 30 s)."""
        while not self._stop:
            time.sleep(0.2)
            now = time.monotonic()
            changed = False
            for c in self.children:
                if c.alive() or self._stop:
                    continue
                if c.next_start == 0.0:
                    backoff = min(30.0, 2.0 ** c.restarts) if now - c.started_at < 60 else 1.0
                    c.next_start = now + backoff
                    self.log(f"{c.name} (pid {c.pid}) exited with {c.proc.returncode}; restarting in {backoff:.0f} s "
                             f"(see {c.log})")
                elif now >= c.next_start:
                    # started without waiting: a slow start (a model loading) must not hold up the
                    # supervision of the others, nor SIGTERM; state.json names the new PID at once
                    c.restarts += 1
                    c.next_start = 0.0
                    c.start(wait_ready=False)
                    c.ready_by = now + 600.0
                    changed = True
            for c in self.children:
                if c.ready_by and c.alive():
                    if c.poll_ready():
                        c.ready_by = 0.0
                        self.log(f"{c.name} restarted (pid {c.pid})")
                        changed = True
                    elif now > c.ready_by:
                        self.log(f"{c.name} (pid {c.pid}) did not become ready in 600 s; killing it")
                        c.ready_by = 0.0
                        c.stop(grace=5.0)
            for i, e in enumerate(self.etcds):  # an embedded etcd member that died comes back, same data
                if self._stop or e.proc is None or e.proc.poll() is None:
                    continue
                if i not in self._etcd_restart:
                    self._etcd_restart[i] = now + 1.0
                    self.log(f"{e.name} (pid {e.proc.pid}) exited with {e.proc.returncode}; restarting in 1 s")
                if now >= self._etcd_restart[i]:
                    del self._etcd_restart[i]
                    try:
                        e.restart()
                        self.log(f"{e.name} restarted (pid {e.proc.pid})")
                    except Exception as err:  # EtcdError, OSError: try again later
                        self.log(f"{e.name} failed to restart: {err}")
                    changed = True
            if changed:
                coords = [c for c in self.children if c.args[0] == "coordinator"]
                self._write_state(self.etcd_endpoints, coords[0].info.get("admin", "") if coords else "")

    def request_stop(self, *_) -> None:
        self._stop = True

    def shutdown(self) -> None:
        self._stop = True
        for c in reversed(self.children):  # gateway first (drains), then workers, then the coordinator
            c.stop(grace=40.0 if c.args[0] == "gateway" else 15.0)  # the gateway drains up to 30 s
        for e in self.etcds:
            e.stop()
        try:
            (self.state_dir / "state.json").unlink()
        except FileNotFoundError:
            pass
        self.log("stopped")


def up(args) -> int:
    if args.detach:
        return _detach(args)
    try:
        sup = Supervisor(args)
    except ValueError as e:  # the cluster file
        print(f"error: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    try:
        sup.start()
        if args.ready_file:
            Path(args.ready_file).write_text(json.dumps({"url": sup.url}))
        sup.supervise()
    except KeyboardInterrupt:
        pass
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sup.shutdown()
    return 0


def _detach(args) -> int:
    try:
        name = spec_from_args(args).name
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir(name)
    state_dir.mkdir(parents=True, exist_ok=True)
    ready = state_dir / "ready.json"
    ready.unlink(missing_ok=True)
    argv = [a for a in sys.argv[1:] if a != "--detach"]
    if not argv or argv[0] != "up":
        argv = ["up", *[a for a in argv if a != "up"]]
    argv = [*argv, "--state-dir", str(state_dir), "--ready-file", str(ready)]
    log = open(state_dir / "supervisor.log", "a")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", *argv], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if ready.exists():
            print((state_dir / "supervisor.log").read_text()[-3000:].rstrip())
            print(f"detached (supervisor pid {proc.pid}); `cluster down --state-dir {state_dir}` stops it")
            return 0
        if proc.poll() is not None:
            print((state_dir / "supervisor.log").read_text()[-3000:], file=sys.stderr)
            return 1
        time.sleep(0.2)
    return 1
