"""`cluster up --detach` from a clean state directory, a request through the gateway, a worker killed
and restarted by the supervisor, then `cluster down`: every process gone (by PID), every port free."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from live_cluster import pid_alive, post_json

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind (TIME_WAIT is not "in use")
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_up_request_restart_down(tmp_path, tiny_llama):
    state = tmp_path / "state"
    up = cli("up", "--state-dir", str(state), "--model", str(tiny_llama), "--port", "0", "--admin-port", "0",
             "--kv-cache-memory", "2MiB", "--detach")
    assert up.returncode == 0, up.stdout + up.stderr
    st = json.loads((state / "state.json").read_text())
    pids = [st["supervisor_pid"], st["etcd_pid"]] + [c["pid"] for c in st["children"].values()]
    ports = [int(u.rsplit(":", 1)[1]) for u in (st["url"], st["admin"], st["etcd"])]
    try:
        assert set(st["children"]) == {"coordinator", "prefill-0", "decode-0", "gateway"}
        model = os.path.basename(str(tiny_llama))
        status, body, _ = post_json(st["url"] + "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 4})
        assert status == 200 and body["usage"]["completion_tokens"] == 4
        out = cli("status", "--state-dir", str(state))
        assert out.returncode == 0 and "decode-0" in out.stdout and "live" in out.stdout, out.stdout + out.stderr

        # a worker that dies is restarted by the supervisor, and the cluster serves again
        old = st["children"]["decode-0"]["pid"]
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 60
        new = old
        while time.monotonic() < deadline and new == old:
            time.sleep(0.2)
            new = json.loads((state / "state.json").read_text())["children"]["decode-0"]["pid"]
        assert new != old and pid_alive(new)
        pids.append(new)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, body, _ = post_json(st["url"] + "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 4})
            if status == 200:
                break
            time.sleep(0.3)
        assert status == 200, body
        assert "restarting" in (state / "supervisor.log").read_text()
    finally:
        down = cli("down", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if pid_alive(p)]
    assert all(port_free(p) for p in ports)
    assert not (state / "state.json").exists()
