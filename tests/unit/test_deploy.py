"""deploy/ is validated, not only parsed: Kubernetes manifests against the API's JSON schemas (strict:
no unknown fields), every command line in them against the `cluster` CLI's own parser, the cluster
file in the ConfigMap against cluster/config.py, the Slurm script by bash, and every metric the
Grafana dashboard queries against the metrics the code defines."""

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.cli import build_parser
from cluster.config import loads

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S_VERSION = "1.30.0"


def manifests():
    for f in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                yield f.name, doc


def test_every_manifest_is_valid_against_the_kubernetes_schemas_strictly():
    import kubernetes_validate
    kinds = set()
    for name, doc in manifests():
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")
        kinds.add((doc["kind"], doc["metadata"]["name"]))
    assert {("StatefulSet", "etcd"), ("Deployment", "coordinator"), ("Deployment", "gateway"), ("Service", "gateway"),
            ("StatefulSet", "prefill"), ("StatefulSet", "decode"), ("ConfigMap", "tandem-cluster")} <= kinds
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in manifests()}
    assert docs[("StatefulSet", "etcd")]["spec"]["replicas"] == 3
    assert docs[("Deployment", "coordinator")]["spec"]["replicas"] == 2
    for role in ("prefill", "decode"):
        limits = docs[("StatefulSet", role)]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 1


def test_a_broken_manifest_is_caught():
    import kubernetes_validate
    _, doc = next((n, d) for n, d in manifests() if d["kind"] == "Deployment")
    bad = json.loads(json.dumps(doc))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = json.loads(json.dumps(doc))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_container_command_lines_are_accepted_by_the_cli():
    parser = build_parser()
    seen = set()
    for _name, doc in manifests():
        if doc["kind"] not in ("Deployment", "StatefulSet") or doc["metadata"]["name"] == "etcd":
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            args = [re.sub(r"\$\((\w+)\)", lambda m: {"POD_IP": "10.0.0.5"}.get(m.group(1), "pod-0"), a)
                    for a in c["args"]]
            ns = parser.parse_args(args)  # SystemExit on an unknown flag or a bad value
            seen.add(ns.cmd)
    assert seen == {"coordinator", "gateway", "worker"}


def test_the_configmap_cluster_file_and_the_systemd_unit():
    cm = next(d for _, d in manifests() if d["kind"] == "ConfigMap")
    spec = loads(cm["data"]["cluster.toml"], "configmap cluster.toml")
    assert spec.coordinator.replicas == 2 and len(spec.etcd.endpoints) == 3
    unit = (DEPLOY / "systemd" / "tandem@.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start.removeprefix("ExecStart=").replace("%i", "gpu-a"))
    ns = build_parser().parse_args(argv[1:])
    assert ns.cmd == "up" and ns.node == "gpu-a" and ns.file == "/etc/tandem/cluster.toml"


def test_the_slurm_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(DEPLOY / "slurm" / "tandem.sbatch")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_the_grafana_dashboard_queries_metrics_that_exist():
    dash = json.loads((DEPLOY / "grafana" / "tandem.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"tandem_\w+", e)}
    src = "".join(p.read_text() for d in ("cluster", "common", "coordinator", "gateway")
              for p in (DEPLOY.parent / d).glob("*.py"))
    defined = set()
    for kind, name in re.findall(r'\.(counter|gauge|histogram)\(\s*"(\w+)"', src):
        base = "tandem_" + name
        defined |= {base + "_total"} if kind == "counter" else {base}
        if kind == "histogram":
            defined |= {base + "_bucket", base + "_sum", base + "_count"}
    # series a Collector makes at scrape time (coordinator/status.py's WorkerCollector)
    for kind, name in re.findall(r'(Gauge|Counter)MetricFamily\(\s*"(\w+)"', src):
        defined |= {name + "_total"} if kind == "Counter" else {name}
    assert used and used <= defined, used - defined
