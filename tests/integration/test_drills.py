"""Every `cluster drill` scenario `cluster up` supports, at small scale on the tiny model, against one
cluster (3-member etcd, 2 coordinators, 2 prefill, 2 decode workers, 2 gateways): each meets its target."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("drills")
    (tmp / "c.toml").write_text(f"""
name = "drills"
[etcd]
members = 3
[model]
path = "{tiny_llama}"
[gateway]
port = 0
replicas = 2
[coordinator]
admin_port = 0
replicas = 2
[[pool]]
role = "prefill"
replicas = 2
kv_cache_memory = "4MiB"
[[pool]]
role = "decode"
replicas = 2
kv_cache_memory = "4MiB"
""")
    up = cli("up", "-f", str(tmp / "c.toml"), "--state-dir", str(tmp / "state"), "--detach")
    assert up.returncode == 0, up.stdout + up.stderr
    yield tmp
    down = cli("down", "--state-dir", str(tmp / "state"))
    assert down.returncode == 0, down.stderr


@pytest.mark.parametrize("scenario", ["kill-decode", "kill-prefill", "drain-decode", "kill-coordinator",
                                      "restart-gateway", "kill-etcd-member"])
def test_drill_meets_its_target(cluster, scenario):
    report = cluster / f"{scenario}.json"
    r = cli("drill", scenario, "--state-dir", str(cluster / "state"), "--requests", "16", "--concurrency", "8",
            "--max-tokens", "200", "--json", str(report))
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr + (cluster / "state" / "supervisor.log").read_text()[-3000:]
    rep = json.loads(report.read_text())
    assert rep["passed"] and rep["differing"] == 0 and rep["duplicated_tokens"] == 0
    assert rep["whole_again_s"] is not None
    if scenario == "restart-gateway":
        assert rep["completed"] >= rep["requests"] // 2
    else:
        assert rep["failed"] == 0 and rep["completed"] == rep["requests"]
    if scenario == "kill-decode":
        assert rep["migrated"] >= 1
    # kill-prefill: whether a request is caught on the hung prefill worker depends on timing (the
    # coordinator stops placing there as soon as its confirmations lag); the deterministic prefill
    # failover test is tests/integration/test_gateway.py::test_kill_9_of_a_prefill_worker_during_prefill
    if scenario == "kill-etcd-member":
        assert rep["migrated"] == 0  # nothing visible to serving
