"""OutputThread: order, the bounded lag, failure surfacing on the loop thread, close."""

import threading
import time

import pytest

from common.output_thread import OutputThread, OutputThreadError


def test_items_are_handled_in_order_and_close_handles_what_was_submitted():
    seen = []
    out = OutputThread(seen.append)
    for i in range(50):
        out.submit(i, wait=i % 2 == 0)
    out.close()
    assert seen == list(range(50))


def test_submit_waits_while_a_step_is_unhandled():
    release = threading.Event()
    started = threading.Event()

    def handle(item):
        started.set()
        assert release.wait(5)

    out = OutputThread(handle, max_lag=1, timeout=5)
    out.submit("k")
    assert started.wait(5)
    t0 = time.monotonic()
    threading.Timer(0.2, release.set).start()
    out.submit("k+1")  # step k+2 may not start before step k is handled
    assert time.monotonic() - t0 >= 0.15
    out.close()


def test_a_failing_handler_is_raised_on_the_loop_thread():
    def handle(item):
        if item == "bad":
            raise ValueError("boom")

    out = OutputThread(handle, timeout=5)
    out.submit("bad")
    with pytest.raises(OutputThreadError, match="boom"):
        out.submit("next")  # waits for "bad", which failed
    with pytest.raises(OutputThreadError):
        out.check()
    out.close()


def test_a_stuck_handler_times_out_the_submit():
    gate = threading.Event()
    out = OutputThread(lambda item: gate.wait(5), timeout=0.2)
    out.submit(1)
    with pytest.raises(OutputThreadError, match="handled nothing"):
        out.submit(2)
    gate.set()
    out.close()
