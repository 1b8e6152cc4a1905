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
        assert set(st["children"]) == {"coordinator-0", "prefill-0", "decode-0", "gateway-0"}
        model = os.path.basename(str(tiny_llama))
        status, body, _ = post_json(st["url"] + "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 4})
        assert status == 200 and body["usage"]["completion_tokens"] == 4
        gen = cli("generate", "--url", st["url"], "--prompt", "hello", "--max-tokens", "5", "--temperature", "0")
        assert gen.returncode == 0 and "[5 tokens via" in gen.stderr, gen.stdout + gen.stderr
        direct = cli("generate", "--model", str(tiny_llama), "--block-size", "16", "--prompt", "hello",
                     "--max-tokens", "5", "--temperature", "0", "-q")
        assert gen.stdout == direct.stdout  # through the cluster == in one process (greedy)
        bench = cli("bench", "--state-dir", str(state), "--rates", "10,40", "--duration", "2", "--warmup", "0.5",
                    "--prompt-tokens", "16", "--output-tokens", "8", "--ttft-ms", "2000", "--tpot-ms", "500",
                    "--json", str(tmp_path / "bench.json"), "--plots", str(tmp_path / "plots"), "-q")
        assert bench.returncode == 0, bench.stdout + bench.stderr
        rep = json.loads((tmp_path / "bench.json").read_text())
        assert [r["rate"] for r in rep["results"]] == [10, 40] and rep["goodput_rps"] == 40
        assert all(r["failed"] == 0 and r["completed"] > 0 and r["ttft_s"]["p99"] > 0 for r in rep["results"])
        assert (tmp_path / "plots" / "latency_cdf.png").stat().st_size > 1000
        out = cli("status", "--state-dir", str(state))
        assert out.returncode == 0 and "decode-0" in out.stdout and "live" in out.stdout, out.stdout + out.stderr
        assert f"gateway gateway-0: {st['url']}" in out.stdout

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


def test_two_hosts_from_one_cluster_file(tmp_path, tiny_llama):
    """Each host runs `cluster up -f FILE --host NAME` and starts only its share; the workers on host b
    (127.0.0.2) find etcd, the coordinator and the gateway on host a (127.0.0.1) through etcd."""
    from cluster.etcd_server import free_port
    port = free_port()
    (tmp_path / "c.toml").write_text(f"""
name = "twohosts"
[etcd]
host = "a"
client_port = {port}
[model]
path = "{tiny_llama}"
[gateway]
port = 0
hosts = ["a"]
[coordinator]
admin_port = 0
hosts = ["a"]
[[pool]]
role = "prefill"
hosts = ["b"]
kv_cache_memory = "2MiB"
[[pool]]
role = "decode"
hosts = ["b"]
kv_cache_memory = "2MiB"
[hosts.a]
address = "127.0.0.1"
[hosts.b]
address = "127.0.0.2"
""")
    sa, sb = tmp_path / "a", tmp_path / "b"
    a = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up", "-f", str(tmp_path / "c.toml"), "--host", "a",
                          "--state-dir", str(sa), "--detach"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        b = cli("up", "-f", str(tmp_path / "c.toml"), "--host", "b", "--state-dir", str(sb), "--detach")
        assert b.returncode == 0, b.stdout + b.stderr
        out, _ = a.communicate(timeout=120)  # host a's gateway was waiting for workers to register
        assert a.returncode == 0, out
        st_a = json.loads((sa / "state.json").read_text())
        st_b = json.loads((sb / "state.json").read_text())
        assert set(st_a["children"]) == {"coordinator-0", "gateway-0"}
        assert set(st_b["children"]) == {"prefill-0", "decode-0"}
        status, body, _ = post_json(st_a["url"] + "/v1/completions",
                                    {"model": os.path.basename(str(tiny_llama)), "prompt": "hi", "max_tokens": 4})
        assert status == 200 and body["usage"]["completion_tokens"] == 4
        from live_cluster import get_json
        ws = get_json(st_a["admin"] + "/v1/cluster")["workers"]
        assert {w["endpoint"].split(":")[1] for w in ws} == {"//127.0.0.2"}
        from engine.platform import resolve_dtype
        assert {w["dtype"] for w in ws} == {resolve_dtype("auto", "cpu")}  # the default, resolved where they run
    finally:
        cli("down", "--state-dir", str(sb))
        cli("down", "--state-dir", str(sa))
        if a.poll() is None:
            a.kill()
