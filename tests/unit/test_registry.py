import time

from common.kv_layout import KVLayoutSpec
from common.registry import DirectoryRegistry, Load, WorkerInfo


def info(wid, role="decode"):
    return WorkerInfo(wid, role, "m", 1, 1, 16, 1024, "tcp://127.0.0.1:1", [], KVLayoutSpec(30, 3, 64, 16, "float32"), 1, 0.5)


def load(wid, ts=None, running=0):
    return Load(wid, ts if ts is not None else time.time(), 0, running, 10, 10, 0.0, 0)


def test_register_heartbeat_stale_deregister(tmp_path):
    reg = DirectoryRegistry(tmp_path, stale_after=1.0)
    reg.register(info("d0"))
    reg.register(info("p0", "prefill"))
    assert reg.workers() == []  # no heartbeat yet: not live
    reg.heartbeat(load("d0", running=3))
    reg.heartbeat(load("p0", ts=time.time() - 5))  # stale
    assert [w.worker_id for w in reg.workers()] == ["d0"]
    assert [w.worker_id for w in reg.workers(live_only=False)] == ["d0", "p0"]
    assert [w.worker_id for w in reg.workers(role="prefill", live_only=False)] == ["p0"]
    assert reg.load("d0").num_running == 3
    reg.deregister("d0")
    assert reg.load("d0") is None and reg.workers() == []
    (tmp_path / "workers" / "junk.json").write_text("{not json")
    assert [w.worker_id for w in reg.workers(live_only=False)] == ["p0"]
