"""`cluster drill SCENARIO`: rehearse a failure under load against a running cluster (`cluster up`)
and report what the clients saw. Torch-free.

    cluster drill kill-decode [--requests 32 --concurrency 8 --max-tokens 64] [--json report.json]

1. A reference run: every prompt once, greedy, no fault (so a lost or duplicated token is visible
   as a difference, token by token).
2. The same prompts again, streaming with `return_token_ids`; once every stream is under way, the
   fault is injected.
3. The report: requests sent, completed, failed, migrated (the gateways' migration counters), those
   whose tokens differ from the reference (lost or duplicated tokens), the longest silence of a stream
   across the fault (fault -> first token after recovery), and the time until the cluster was whole
   again (the supervisor restarted what was killed and it is live in the coordinator's view).

partition-host (--cut CMD, wait --partition-s, --heal CMD: a host's network cut and restored; with
--victim WORKER the cluster is whole when that worker is live again). Scenarios: kill-decode (SIGKILL of the busiest decode worker), kill-prefill (the busiest prefill
worker hangs for 0.5 s while requests keep arriving, then is SIGKILLed), kill-coordinator
(SIGKILL of the leader; needs a standby), restart-gateway (SIGKILL of one of two gateways; clients
move to the other: only the killed gateway's streams may fail, each with a clean error),
drain-decode (graceful: the busiest decode worker is drained), kill-etcd-member (SIGKILL of one
member of a 3-member embedded etcd: `[etcd] members = 3`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field

FREEZE_S = 0.5  # kill-prefill: how long the victim hangs before it dies

SCENARIOS = ("kill-prefill", "kill-decode", "kill-coordinator", "restart-gateway", "drain-decode", "kill-etcd-member",
             "partition-host")


@dataclass
class Report:
    scenario: str
    requests: int = 0
    completed: int = 0
    failed: int = 0
    migrated: int = 0
    differing: int = 0  # token ids differ from the undisturbed run (lost or duplicated tokens)
    duplicated_tokens: int = 0
    fault_at_s: float = 0.0
    recovery_s: float = 0.0  # the longest silence of a stream across the fault (fault -> tokens again)
    whole_again_s: float | None = None
    target: str = ""
    passed: bool = False
    errors: list[str] = field(default_factory=list)
    victim: str = ""


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _metric(url: str, name: str) -> float:
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[-1])
    except OSError:
        pass
    return 0.0


async def _stream(session, urls: list[str], model: str, prompt: str, max_tokens: int, log: list, used: list):
    """One greedy streaming completion; on a connection failure before the first byte, the next
    gateway in the list is tried (what a client with several gateway URLs does)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    last_err = None
    for url in urls:
        ids: list[int] = []
        used.append(url)
        try:
            async with session.post(url + "/v1/completions", json=body) as r:
                if r.status != 200:
                    return ids, f"HTTP {r.status}: {(await r.text())[:200]}"
                async for line in r.content:
                    if line.startswith(b"data: [DONE]"):
                        return ids, None
                    if line.startswith(b"data: "):
                        ev = json.loads(line[6:])
                        if "error" in ev:
                            return ids, ev["error"]["message"]
                        new = ev["choices"][0].get("token_ids") or []
                        if new:
                            log.append(time.monotonic())
                        ids += new
                return ids, "stream ended without [DONE]"
        except Exception as e:  # connection refused/reset: the next gateway
            last_err = f"{type(e).__name__}: {e}"
            if ids:
                return ids, last_err  # broke mid-stream: this gateway's stream is lost
    return [], last_err


def _pids(state: dict) -> dict:
    return {n: c["pid"] for n, c in state["children"].items()}


def _busiest(admin: str, role: str) -> str:
    ws = [w for w in _get(admin + "/v1/cluster")["workers"] if w["role"] == role and w["state"] == "live"]
    if not ws:
        raise RuntimeError(f"no live {role} worker to inject the fault into")
    return max(ws, key=lambda w: ((w["load"] or {}).get("num_running", 0) + (w["load"] or {}).get("num_waiting", 0)
                                  + w["pending_placements"], w["worker_id"]))["worker_id"]


def _inject(scenario: str, state: dict, args=None) -> tuple[str, str]:
    """Returns (victim, what to wait for to call the cluster whole)."""
    admin, pids = state["admin"], _pids(state)
    if scenario == "partition-host":
        if not args.cut or not args.heal:
            raise RuntimeError("partition-host needs --cut CMD and --heal CMD (how to cut this host's network "
                               "and restore it, e.g. 'ip link set veth-b down' / '... up')")
        import subprocess
        subprocess.run(args.cut, shell=True, check=True, timeout=30)
        time.sleep(args.partition_s)
        subprocess.run(args.heal, shell=True, check=True, timeout=30)
        return args.victim or "partitioned host", "partition"
    if scenario == "kill-decode":
        victim = _busiest(admin, "decode")
        os.kill(pids[victim], signal.SIGKILL)
        return victim, "worker"
    if scenario == "kill-prefill":
        # a prompt's prefill takes milliseconds on a small model: to die *during* prefill, the worker
        # hangs first (SIGSTOP) while requests keep arriving, then is killed
        victim = _busiest(admin, "prefill")
        os.kill(pids[victim], signal.SIGSTOP)
        time.sleep(FREEZE_S)
        os.kill(pids[victim], signal.SIGKILL)
        return victim, "worker"
    if scenario == "drain-decode":
        victim = _busiest(admin, "decode")
        req = urllib.request.Request(f"{admin}/v1/workers/{victim}/drain", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=5).read()
        return victim, "none"
    if scenario == "kill-coordinator":
        coords = [n for n in pids if n.startswith("coordinator")]
        if len(coords) < 2:
            raise RuntimeError("kill-coordinator needs a standby (coordinator.replicas >= 2 in the cluster file)")
        leader = (_get(admin + "/v1/cluster").get("leader") or {}).get("coordinator_id")
        os.kill(pids[leader], signal.SIGKILL)
        return leader, "coordinator"
    if scenario == "kill-etcd-member":
        members = state.get("etcd_members", [])
        if len(members) < 3:
            raise RuntimeError("kill-etcd-member needs a 3-member embedded etcd ([etcd] members = 3 in the cluster file)")
        os.kill(members[0]["pid"], signal.SIGKILL)
        return members[0]["name"], "etcd"
    if scenario == "restart-gateway":
        gws = sorted(n for n in pids if n.startswith("gateway"))
        if len(gws) < 2:
            raise RuntimeError("restart-gateway needs two gateways (gateway.replicas = 2 in the cluster file)")
        os.kill(pids[gws[0]], signal.SIGKILL)
        return gws[0], "gateway"
    raise ValueError(f"unknown scenario {scenario!r}; one of {', '.join(SCENARIOS)}")


def _whole(state_file, victim: str, kind: str, old_pid: int, admin_candidates: list[str]) -> bool:
    st = json.loads(open(state_file).read())
    if kind == "none":
        return True
    if kind == "partition":  # the partitioned worker is back in the coordinators' view (a new lease)
        return _live_in_view(victim, admin_candidates)
    if kind == "etcd":
        m = next((m for m in st.get("etcd_members", []) if m["name"] == victim), None)
        return m is not None and m["pid"] != old_pid and _ok(m["endpoint"] + "/health")
    pid = st["children"].get(victim, {}).get("pid")
    if pid is None or pid == old_pid:
        return False
    if kind == "worker":
        return _live_in_view(victim, admin_candidates)
    if kind == "gateway":
        url = st["children"][victim].get("url")
        return url is None or _ok(url + "/ready")
    return True


def _live_in_view(worker_id: str, admins: list[str]) -> bool:
    """The first coordinator that answers says the worker is live."""
    for admin in admins:
        try:
            ws = {w["worker_id"]: w for w in _get(admin + "/v1/cluster", 2)["workers"]}
            return ws.get(worker_id, {}).get("state") == "live"
        except OSError:
            continue
    return False


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


async def _run(args, state: dict, state_file: str) -> Report:
    import aiohttp

    urls = state.get("gateways") or [state["url"]]
    model = _get(urls[0] + "/v1/models")["data"][0]["id"]
    prompts = [f"drill {i}: the story of a {w} who" for i, w in
               zip(range(args.requests), (["cat", "ship", "river", "tower", "clock", "lamp", "garden", "storm"] * 999))]
    rep = Report(args.scenario, requests=len(prompts))
    sem = asyncio.Semaphore(args.concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as s:
        async def one(i, p, log, used):
            async with sem:  # clients spread over the gateways, each falling back to the others
                order = urls[i % len(urls):] + urls[:i % len(urls)]
                return await _stream(s, order, model, p, args.max_tokens, log, used)
        ref = await asyncio.gather(*(one(i, p, [], []) for i, p in enumerate(prompts)))
        if any(err for _, err in ref):
            raise RuntimeError(f"the reference run failed before any fault: {[e for _, e in ref if e][:3]}")
        migrations0 = {u: _metric(u, "tandem_migrations_total") for u in urls}
        logs: list[list[float]] = [[] for _ in prompts]
        useds: list[list[str]] = [[] for _ in prompts]
        tasks = [asyncio.create_task(one(i, p, logs[i], useds[i])) for i, p in enumerate(prompts)]
        t0 = time.monotonic()
        while sum(1 for lg in logs if lg) < min(args.concurrency, len(prompts)) and time.monotonic() - t0 < 60:
            await asyncio.sleep(0.005)
        fault_t = time.monotonic()
        victim, kind = await asyncio.to_thread(_inject, args.scenario, state, args)
        rep.victim = victim
        old_pid = state["children"][victim]["pid"] if kind in ("worker", "coordinator", "gateway") else \
            next((m["pid"] for m in state.get("etcd_members", []) if m["name"] == victim), None)
        rep.fault_at_s = fault_t - t0
        got = await asyncio.gather(*tasks)
        admins = [state["admin"]] + state.get("admins", [])
        deadline = time.monotonic() + args.whole_timeout
        while time.monotonic() < deadline:
            if await asyncio.to_thread(_whole, state_file, victim, kind, old_pid, admins):
                rep.whole_again_s = time.monotonic() - fault_t
                break
            await asyncio.sleep(0.1)
        # a restarted gateway's counters start again at 0: count only the ones that did not restart
        rep.migrated = int(sum(max(0.0, _metric(u, "tandem_migrations_total") - m0) for u, m0 in migrations0.items()))
    killed_url = state["children"].get(rep.victim, {}).get("url")
    foreign_failures = 0
    for (want, _), (ids, err), lg, used in zip(ref, got, logs, useds):
        if err is None and len(ids) == len(want):
            rep.completed += 1
        else:
            rep.failed += 1
            rep.errors.append(err or f"{len(ids)} of {len(want)} tokens")
            foreign_failures += bool(used) and used[-1] != killed_url
        if err is None and ids != want:
            rep.differing += 1
            rep.duplicated_tokens += max(0, len(ids) - len(want))
        # the longest silence of a stream that was running when the fault hit
        if lg and lg[0] <= fault_t < lg[-1]:
            gaps = [b_ - a_ for a_, b_ in zip(lg, lg[1:]) if b_ > fault_t]
            rep.recovery_s = max(rep.recovery_s, max(gaps, default=0.0))
    if args.scenario == "restart-gateway":
        rep.target = "failures only on the killed gateway's streams, each a clean error; nothing duplicated"
        rep.passed = rep.differing == 0 and foreign_failures == 0
    else:
        rep.target = "zero failed, zero differing from the undisturbed run"
        rep.passed = rep.failed == 0 and rep.differing == 0
    return rep


def drill(args) -> int:
    from pathlib import Path

    from cluster.ops import default_state_dir, read_state
    if args.scenario not in SCENARIOS:
        print(f"error: unknown scenario {args.scenario!r}; one of {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    try:
        state = read_state(args)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir(args.cluster)
    try:
        rep = asyncio.run(_run(args, state, str(state_dir / "state.json")))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    d = asdict(rep)
    whole = f"{rep.whole_again_s:.1f} s" if rep.whole_again_s is not None else "not within the timeout"
    print(f"drill {rep.scenario} (victim {rep.victim}): {rep.requests} requests, {rep.completed} completed, "
          f"{rep.failed} failed, {rep.migrated} migrated, {rep.differing} differing from the undisturbed run "
          f"({rep.duplicated_tokens} extra tokens); longest stall {rep.recovery_s:.2f} s; "
          f"whole again after {whole}; target: {rep.target}: {'PASS' if rep.passed else 'FAIL'}")
    for e in rep.errors[:5]:
        print(f"  error: {e}")
    if args.json:
        Path(args.json).write_text(json.dumps(d, indent=1))
    return 0 if rep.passed else 1
