"""The per-worker SLO attainment window that heartbeats carry."""

from common.heartbeat import Heartbeat, SloWindow
from common.registry import Load


def test_counts_met_and_missed_within_the_window_only():
    w = SloWindow(window_s=10.0)
    w.record("ttft", 0.100, 200, now=0.0)   # met
    w.record("ttft", 0.300, 200, now=1.0)   # missed
    w.record("ttft", 0.200, 200, now=2.0)   # exactly at the target: met
    w.record("tpot", 0.050, None, now=2.0)  # no SLO: not counted
    w.record("tpot", 0.050, 40, now=3.0)    # missed
    assert w.counts(now=5.0) == {"ttft": (2, 3), "tpot": (0, 1)}
    assert w.counts(now=10.5) == {"ttft": (1, 2), "tpot": (0, 1)}  # the first one left the window
    assert w.counts(now=20.0) == {"ttft": (0, 0), "tpot": (0, 0)}


class _Engine:
    def stats(self):
        return {"num_waiting": 0, "num_running": 0, "num_free_blocks": 8, "num_blocks": 8, "num_queued_tokens": 0}


class _Registry:
    def __init__(self):
        self.loads: list[Load] = []

    def heartbeat(self, load):
        self.loads.append(load)


def test_heartbeats_carry_the_window():
    reg = _Registry()
    hb = Heartbeat(reg, "w0", interval=0.0)
    hb.slo.record("ttft", 0.1, 50, now=100.0)
    hb.slo.record("ttft", 0.01, 50, now=100.0)
    hb.slo.record("tpot", 0.01, 50, now=100.0)
    load = hb.maybe_beat(_Engine(), now=101.0)
    assert (load.ttft_met, load.ttft_total, load.tpot_met, load.tpot_total) == (1, 2, 1, 1)
