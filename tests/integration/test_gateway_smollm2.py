"""The gateway on the default model (SmolLM2-135M-Instruct): greedy chat through the whole cluster
equals the single-process engine, and a client that disconnects frees the workers' blocks at once."""

import http.client
import json
import socket
import time
from urllib.parse import urlparse

import openai
import pytest
from live_cluster import LiveCluster, get_json

from engine import EngineConfig, LLMEngine, SamplingParams

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def live(tmp_path_factory, smollm2_dir):
    c = LiveCluster(tmp_path_factory.mktemp("smol"), smollm2_dir, worker_flags=("--kv-cache-memory", "64MiB"))
    try:
        c.coord = c.coordinator()
        c.worker("prefill", "p0")
        c.worker("decode", "d0")
        c.gw = c.gateway()
        c.wait_ready(c.gw, timeout=60)
    except BaseException:
        print(c.logs())
        c.close()
        raise
    yield c
    c.close()


def test_greedy_chat_through_the_cluster_equals_one_process(live, smollm2_dir):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    eng = LLMEngine(EngineConfig(str(smollm2_dir)))
    ids = eng.tokenizer.encode(eng.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    want = eng.generate([ids], SamplingParams(max_tokens=32, temperature=0))[0]["outputs"][0]["text"]
    eng.shutdown()
    client = openai.OpenAI(base_url=live.gw.info["url"] + "/v1", api_key="x", max_retries=0, timeout=120)
    got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=32, temperature=0)
    assert got.choices[0].message.content == want
    assert "Paris" in want


def idle(live, worker_id):
    w = {w["worker_id"]: w for w in get_json(live.coord.info["admin"] + "/v1/cluster")["workers"]}[worker_id]
    load = w["load"]
    return load["num_running"] == 0 and load["num_waiting"] == 0 and load["free_blocks"] == load["num_blocks"]


def wait_busy(live, worker_id, timeout=3.0):
    """Until a heartbeat shows the request running there (load samples are up to 0.2 s old)."""
    t0 = time.monotonic()
    while idle(live, worker_id):
        assert time.monotonic() - t0 < timeout, f"{worker_id} never showed the request running"
        time.sleep(0.02)


def test_a_client_disconnect_frees_prefill_and_decode_blocks_within_1_s(live):
    url = urlparse(live.gw.info["url"])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({
        "model": NAME, "prompt": "Write a long story about a lighthouse keeper.", "max_tokens": 400,
        "temperature": 0, "ignore_eos": True, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    got = 0
    while got < 3:  # a few tokens in: the request is decoding on d0
        line = resp.fp.readline()
        got += line.startswith(b"data: {")
    wait_busy(live, "d0")
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream (close() alone keeps the fd:
    conn.sock.close()  # the response file still refers to it)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.0 and not (idle(live, "d0") and idle(live, "p0")):
        time.sleep(0.02)
    assert idle(live, "d0") and idle(live, "p0"), f"blocks not freed within 1 s:\n{live.logs()}"


def test_a_dead_gateway_s_requests_are_cancelled_on_the_workers(live):
    """DESIGN §7: a gateway dies (kill -9) mid-stream; when its etcd lease expires, the workers abort
    its requests instead of generating for nobody. (Runs last: it kills the module's gateway.)"""
    import os
    import signal
    url = urlparse(live.gw.info["url"])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({
        "model": NAME, "prompt": "Write a long story about a lighthouse keeper.", "max_tokens": 400,
        "temperature": 0, "ignore_eos": True, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    got = 0
    while got < 3:
        got += resp.fp.readline().startswith(b"data: {")
    wait_busy(live, "d0")
    os.kill(live.gw.pid, signal.SIGKILL)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 8.0 and not idle(live, "d0"):  # lease TTL 2 s, then the workers' mirrors
        time.sleep(0.05)
    assert idle(live, "d0"), f"the dead gateway's request still runs:\n{live.logs()}"
    print(f"cancelled {time.monotonic() - t0:.1f} s after the gateway died")
    conn.close()
