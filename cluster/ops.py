"""The commands that act on a cluster `cluster up --detach` started, through the state directory it
writes (state.json: the supervisor, every child, the gateway and admin URLs): `cluster down`,
`status`, `logs` and `drain`. Also what drills, `cluster bench` and `cluster plan` use to find a
running cluster. Torch-free.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def default_state_dir(cluster: str) -> Path:
    base = os.environ.get("TANDEM_STATE_DIR") or os.path.join(os.path.expanduser("~"), ".local", "state", "tandem")
    return Path(base) / cluster


def read_state(args) -> dict:
    """What `cluster up --detach` recorded in the state directory (state.json)."""
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir(args.cluster)
    f = state_dir / "state.json"
    if not f.is_file():
        raise RuntimeError(f"no running cluster recorded in {state_dir} (start one with `cluster up`)")
    return json.loads(f.read_text())


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _state_or_report(args) -> dict | None:
    """`read_state`, or None with the reason on stderr."""
    try:
        return read_state(args)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return None


def down(args) -> int:
    st = _state_or_report(args)
    if st is None:
        return 1
    sup = st["supervisor_pid"]
    if alive(sup):
        os.kill(sup, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while alive(sup) and time.monotonic() < deadline:
            time.sleep(0.1)
    left = [c["pid"] for c in st["children"].values()] + [m["pid"] for m in st.get("etcd_members", [])]
    for pid in left:  # a supervisor that died without cleaning up: stop what it left, by PID
        if alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    print(f"cluster {st['cluster']} stopped")
    return 0


def status(args) -> int:
    try:
        st = read_state(args)
        with urllib.request.urlopen(st["admin"] + "/v1/cluster", timeout=5) as r:
            view = json.loads(r.read())
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(view, indent=1))
        return 0
    print(f"cluster {view['cluster']}: gateway {st['url']}, leader {(view.get('leader') or {}).get('coordinator_id')}, "
          f"policy {view['policy']}")
    print(f"{'WORKER':<12} {'ROLE':<9} {'SHAPE':<8} {'STATE':<9} {'RUN':>4} {'WAIT':>5} {'KV USED':>8} {'STEP ms':>8} "
          f"{'HITS':>5} {'SPEC':>5}  SLO MET (last minute)")
    for w in view["workers"]:
        load = w.get("load") or {}
        used = 1 - load.get("free_blocks", 0) / max(load.get("num_blocks", 1), 1)
        shape = f"tp{w['tp']}pp{w['pp']}"
        print(f"{w['worker_id']:<12} {w['role']:<9} {shape:<8} {w['state']:<9} "
              f"{load.get('num_running', 0):>4} {load.get('num_waiting', 0):>5} {used:>7.0%} "
              f"{load.get('step_ms', 0):>8.1f} {_pct(w.get('prefix_cache_hit_rate')):>5} "
              f"{_pct(w.get('spec_acceptance_rate')):>5}  "
              f"{_slo_cell(w.get('slo_attainment') or {})}")
    for g in view.get("gateways", []):
        print(f"gateway {g['gateway_id']}: {g['url']} ({g['model']}, pid {g['pid']})")
    return 0


def _pct(x: float | None) -> str:
    """A share as a whole percentage ("-" for none): a worker's prefix-cache hit rate."""
    return "-" if x is None else f"{x:.0%}"


def _slo_cell(a: dict) -> str:
    cells = [f"{kind.upper()} {a[kind]:.0%} of {a[kind + '_requests']}" for kind in ("ttft", "tpot")
             if a.get(kind) is not None]
    return ", ".join(cells) or "-"


def logs(args) -> int:
    st = _state_or_report(args)
    if st is None:
        return 1
    names = [args.process] if args.process else list(st["children"])
    for n in names:
        c = st["children"].get(n)
        if c is None:
            print(f"no process {n!r}; one of {', '.join(st['children'])}", file=sys.stderr)
            return 2
        print(f"===== {n} ({c['log']})")
        print(Path(c["log"]).read_text(errors="replace")[-args.bytes:])
    return 0


def drain(args) -> int:
    try:
        st = read_state(args)
        req = urllib.request.Request(f"{st['admin']}/v1/workers/{args.worker}/drain", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=5) as r:
            print(json.loads(r.read()))
    except urllib.error.HTTPError as e:
        print(f"error: {json.loads(e.read())['error']['message']}", file=sys.stderr)
        return 1
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
