"""Three "hosts" as network namespaces joined by veth pairs on a bridge, each with its own address:
etcd + coordinator + gateway on host a, a prefill and a decode worker on host b, a decode worker on
host c; every host runs `cluster up -f cluster.toml --host NAME`. Requests are served across them;
then host c's link is cut (ip link set ... down) under load by `cluster drill partition-host`:
nothing is lost or duplicated, and once the link is back the cut worker rejoins."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import time

import pytest
from live_cluster import get_json, post_json

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def sh(cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def netns():
    """{'a': (netns name, address, root-side veth), ...}; torn down afterwards."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("network namespaces need iproute2 and root (CI runs as root)")
    tag = secrets.token_hex(2)
    br, subnet = f"tdmbr{tag}", f"10.{77 + int(tag, 16) % 100}.0"
    hosts = {h: (f"tdm-{h}-{tag}", f"{subnet}.{i + 1}", f"tdm{h}{tag}") for i, h in enumerate("abc")}
    try:
        r = sh(f"ip link add {br} type bridge", check=False)
        if r.returncode != 0:
            pytest.skip(f"cannot create a bridge here: {r.stderr.strip()}")
        sh(f"ip addr add {subnet}.254/24 dev {br} && ip link set {br} up")
        for ns, addr, veth in hosts.values():
            sh(f"ip netns add {ns}")
            sh(f"ip link add {veth} type veth peer name eth0 netns {ns}")
            sh(f"ip link set {veth} master {br} up")
            sh(f"ip netns exec {ns} ip addr add {addr}/24 dev eth0")
            sh(f"ip netns exec {ns} ip link set eth0 up && ip netns exec {ns} ip link set lo up")
        yield hosts
    finally:
        for ns, _, veth in hosts.values():
            sh(f"ip link del {veth}", check=False)
            sh(f"ip netns del {ns}", check=False)
        sh(f"ip link del {br}", check=False)


def test_three_namespaces_serve_across_hosts_and_survive_a_partition(tmp_path, tiny_llama, netns):
    etcd_port = 23790 + secrets.randbelow(200)
    (tmp_path / "c.toml").write_text(f"""
name = "netns"
[etcd]
host = "a"
client_port = {etcd_port}
[model]
path = "{tiny_llama}"
[gateway]
host = "{netns['a'][1]}"
port = 18000
hosts = ["a"]
[coordinator]
admin_port = 18001
hosts = ["a"]
[[pool]]
role = "prefill"
hosts = ["b"]
kv_cache_memory = "4MiB"
[[pool]]
role = "decode"
replicas = 2
hosts = ["c", "b"]
kv_cache_memory = "4MiB"
[hosts.a]
address = "{netns['a'][1]}"
[hosts.b]
address = "{netns['b'][1]}"
[hosts.c]
address = "{netns['c'][1]}"
""")
    states = {h: tmp_path / f"state-{h}" for h in "abc"}
    procs = {}
    try:
        for h in "abc":  # host a waits for the workers before it reports ready: start all at once
            procs[h] = subprocess.Popen(["ip", "netns", "exec", netns[h][0], sys.executable, "-m", "cluster.cli", "up",
                                         "-f", str(tmp_path / "c.toml"), "--host", h, "--state-dir", str(states[h]),
                                         "--detach"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for h, p in procs.items():
            out, _ = p.communicate(timeout=180)
            assert p.returncode == 0, f"host {h}: {out}"
        st = json.loads((states["a"] / "state.json").read_text())
        url, admin = st["url"], st["admin"]
        assert url == f"http://{netns['a'][1]}:18000"
        ws = {w["worker_id"]: w for w in get_json(admin + "/v1/cluster")["workers"]}
        assert {w: ws[w]["endpoint"].split("//")[1].split(":")[0] for w in ws} == {
            "prefill-0": netns["b"][1], "decode-0": netns["c"][1], "decode-1": netns["b"][1]}
        model = os.path.basename(str(tiny_llama))
        for i in range(6):  # served across the hosts
            status, body, _ = post_json(url + "/v1/completions", {"model": model, "prompt": f"hi {i}", "max_tokens": 8})
            assert status == 200 and body["usage"]["completion_tokens"] == 8, body

        veth_c = netns["c"][2]
        drill = subprocess.run([sys.executable, "-m", "cluster.cli", "drill", "partition-host", "--state-dir",
                                str(states["a"]), "--requests", "16", "--concurrency", "8", "--max-tokens", "200",
                                "--cut", f"ip link set {veth_c} down", "--heal", f"ip link set {veth_c} up",
                                "--partition-s", "4", "--victim", "decode-0", "--json", str(tmp_path / "rep.json")],
                               capture_output=True, text=True, timeout=300)
        print(drill.stdout, drill.stderr)
        rep = json.loads((tmp_path / "rep.json").read_text())
        assert drill.returncode == 0 and rep["passed"], drill.stdout + drill.stderr
        assert rep["failed"] == 0 and rep["differing"] == 0 and rep["duplicated_tokens"] == 0
        assert rep["whole_again_s"] is not None  # decode-0 rejoined with a new lease after the link came back
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ws = {w["worker_id"]: w["state"] for w in get_json(admin + "/v1/cluster")["workers"]}
            if ws == {"prefill-0": "live", "decode-0": "live", "decode-1": "live"}:
                break
            time.sleep(0.2)
        assert ws == {"prefill-0": "live", "decode-0": "live", "decode-1": "live"}, ws
    except BaseException:
        for h in "abc":
            log = states[h] / "supervisor.log"
            print(f"---- host {h}:", log.read_text()[-2000:] if log.exists() else "(no log)")
            for f in sorted((states[h] / "logs").glob("*.log")) if (states[h] / "logs").exists() else []:
                print(f"---- {h}/{f.name}:", f.read_text()[-1500:])
        raise
    finally:
        for h in "cba":
            subprocess.run([sys.executable, "-m", "cluster.cli", "down", "--state-dir", str(states[h])],
                           capture_output=True, timeout=120)
        for p in procs.values():
            if p.poll() is None:
                p.kill()
