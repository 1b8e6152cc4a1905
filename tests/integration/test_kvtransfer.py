"""KV pages between real processes over ZeroMQ (frames, or the tcp transport's page stream) and gloo:
bit-identical round trips for every TP x PP pair, layer-wise streaming, faults (receiver full,
timeouts, a peer killed mid-transfer) and fuzzing of both the ZeroMQ endpoint and the stream."""

import itertools
import json
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq

from kvtransfer.plan import KVLayout
from kvtransfer.protocol import VERSION, Pages, Reserve, StreamHello, decode, encode
from kvtransfer.stream import MAGIC, PREFIX, connect_address

pytestmark = pytest.mark.integration
PEERS = str(Path(__file__).resolve().parents[1] / "kv_peers.py")
SHAPES = [list(s) for s in itertools.product([1, 2], [1, 2])]


def model_spec(model_dir):
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    return {"num_layers": cfg["num_hidden_layers"], "num_kv_heads": cfg.get("num_key_value_heads") or heads,
            "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads}


class Pair:
    def __init__(self, tmp_path, model_dir, prefill, decode, **kw):
        self.tmp = tmp_path
        base = {"model_dir": str(model_dir), "model": model_spec(model_dir), "block_size": 4, "dtype": "float32",
                "num_blocks": 64, "prompt": [(7 * i + 3) % 250 + 3 for i in range(30)]}
        base.update(kw.pop("common", {}))
        self.recv_spec = {**base, "decode": decode, "out": str(tmp_path / "recv"),
                          "expect_ready": kw.pop("expect_ready", len(prefill) * len(decode)),
                          **kw.pop("recv", {})}
        self.send_spec = {**base, "prefill": prefill, "out": str(tmp_path / "send"), **kw.pop("send", {})}

    def start_receiver(self):
        (self.tmp / "recv.json.spec").write_text(json.dumps(self.recv_spec))
        self.receiver = subprocess.Popen([sys.executable, PEERS, "receive", str(self.tmp / "recv.json.spec")],
                                         stdout=subprocess.PIPE, text=True)
        line = self.receiver.stdout.readline()
        info = json.loads(line)
        self.endpoints = info["endpoints"]
        return self.endpoints

    def run_sender(self, timeout=120, **extra):
        spec = {**self.send_spec, "endpoints": self.endpoints, **extra}
        (self.tmp / "send.json.spec").write_text(json.dumps(spec))
        r = subprocess.run([sys.executable, PEERS, "send", str(self.tmp / "send.json.spec")],
                           capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    def wait_receiver(self, timeout=120):
        self.receiver.wait(timeout)
        assert self.receiver.returncode == 0
        return json.loads((self.tmp / "recv.json").read_text())

    def tensors(self, side):
        from safetensors.torch import load_file
        f = self.tmp / f"{side}.safetensors"
        return load_file(str(f)) if f.exists() else {}

    def run(self):
        """Receiver up, sender to completion, receiver done: (receiver report, sender report)."""
        try:
            self.start_receiver()
            self.run_sender()
            report = self.wait_receiver()
        finally:
            self.kill()
        return report, json.loads((self.tmp / "send.json").read_text())

    def kill(self):
        if self.receiver.poll() is None:
            self.receiver.kill()
            self.receiver.wait(10)


def check_bit_identical(pair, spec_model, prefill, decode):
    sent, got = pair.tensors("send"), pair.tensors("recv")
    n = 0
    for p_tp, p_pp in prefill:
        for d_tp, d_pp in decode:
            key = f"{d_tp}x{d_pp}"
            rid = f"p{p_tp}x{p_pp}-d{key}"
            full = sent[rid]  # [layers, 2, blocks, heads, bs, D]
            dst = KVLayout(spec_model["num_layers"], spec_model["num_kv_heads"], spec_model["head_dim"], 4,
                           "float32", d_tp, d_pp)
            for r in range(dst.num_ranks):
                t, p = dst.coords(r)
                (l0, l1), (h0, h1) = dst.layers(p), dst.heads(t)
                mine = got[f"{key}/{rid}/rank{r}"]
                assert torch.equal(mine, full[l0:l1, :, :, h0:h1]), f"{rid} rank {r} differs"
                n += 1
    return n


# a quantized cache (--kv-cache-dtype): pages carry their scales, heads split at any TP; one transport (the CPU
# default) for CI's time: page bytes are bytes to all of them (zmq and gloo were run by hand)
@pytest.mark.parametrize("transport,kv", [("zmq", "auto"), ("tcp", "auto"), ("gloo", "auto"), ("tcp", "int8")])
def test_round_trip_every_tp_pp_pair_is_bit_identical(tmp_path, tiny_llama, transport, kv):
    pair = Pair(tmp_path, tiny_llama, SHAPES, SHAPES, common={"transport": transport, "kv_cache_dtype": kv})
    report, sent = pair.run()
    if kv == "int8":
        assert pair.tensors("send")["p1x1-d1x1"].dtype == torch.int8  # rows of codes and scales
    assert all(a["ok"] for a in sent["acks"].values()) and len(sent["acks"]) == 16, [(k, a) for k, a in sent["acks"].items() if not a["ok"]]
    # 4 prefill shapes x (1 + 2 + 2 + 4) decode ranks, each compared with the sender's pages
    assert check_bit_identical(pair, model_spec(tiny_llama), SHAPES, SHAPES) == 4 * 9
    assert sent["free_blocks"] == sent["num_blocks"]
    for side in report.values():
        assert side["metrics"].get("frames_bad", 0) == 0
        assert side["pending"] == 0
        via_dist = side["metrics"].get("frames_via_dist", 0)
        assert via_dist == (side["metrics"]["frames_ok"] if transport == "gloo" else 0)
    if transport == "tcp":
        assert sent["metrics"].get("messages_streamed", 0) == sent["metrics"]["frames_sent"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["zmq", "tcp", "gloo"])
def test_smollm2_with_three_kv_heads_over_tp_1_and_3(tmp_path, smollm2_dir, transport):
    shapes = [[1, 1], [3, 1]]
    pair = Pair(tmp_path, smollm2_dir, shapes, shapes, common={"block_size": 16, "num_blocks": 32,
                                                                "prompt": list(range(100, 160)),
                                                                "transport": transport})
    _, sent = pair.run()
    assert all(a["ok"] for a in sent["acks"].values()) and len(sent["acks"]) == 4
    sent_t, got = pair.tensors("send"), pair.tensors("recv")
    m = model_spec(smollm2_dir)
    for (p_tp, _), (d_tp, _) in itertools.product(shapes, shapes):
        rid = f"p{p_tp}x1-d{d_tp}x1"
        for r in range(d_tp):
            h0, h1 = (r, r + 1) if d_tp == 3 else (0, m["num_kv_heads"])
            assert torch.equal(got[f"{d_tp}x1/{rid}/rank{r}"], sent_t[rid][:, :, :, h0:h1])


def test_layerwise_streaming_overlaps_compute(tmp_path, tiny_llama):
    pair = Pair(tmp_path, tiny_llama, [[1, 1]], [[1, 1]], send={"layerwise": True, "layer_sleep": 0.15})
    report, sent = pair.run()
    assert all(a["ok"] for a in sent["acks"].values())
    first = report["1x1"]["first_frame_at"]
    # 4 layers, 0.15 s of "compute" each: layer 0's pages arrived while layers 1-3 were computing
    assert first is not None and first < sent["layer_done_at"] - 0.3
    check_bit_identical(pair, model_spec(tiny_llama), [[1, 1]], [[1, 1]])


def test_receiver_full_says_no_room_at_once(tmp_path, tiny_llama):
    stop = tmp_path / "stop"  # the receiver serves until the sender is done (not a fixed window a
    pair = Pair(tmp_path, tiny_llama, [[1, 1]], [[1, 1]], expect_ready=1,  # loaded machine can miss)
                recv={"num_blocks": 3, "serve_seconds": 120, "stop_file": str(stop)})
    try:
        pair.start_receiver()
        t0 = time.monotonic()
        pair.run_sender()
        took = time.monotonic() - t0
        stop.touch()
        report = pair.wait_receiver()
    finally:
        pair.kill()
    sent = json.loads((tmp_path / "send.json").read_text())
    assert sent["acks"]["p1x1-d1x1"] == {"ok": False, "reason": "no room"}
    assert report["1x1"]["free_blocks"] == 3 and sent["free_blocks"] == sent["num_blocks"]
    assert took < 60


@pytest.mark.parametrize("transport", ["zmq", "tcp", "gloo"])
def test_sender_killed_mid_transfer_frees_the_reservation(tmp_path, tiny_llama, transport):
    pair = Pair(tmp_path, tiny_llama, [[1, 1]], [[1, 2]], expect_ready=1,
                common={"transport": transport, "dist_timeout": 2.0},
                recv={"timeout": 1.0, "serve_seconds": 6})
    try:
        pair.start_receiver()
        r = pair.run_sender(kill_after_frames=2)
        assert "killed_after" in r.stdout
        report = pair.wait_receiver()
    finally:
        pair.kill()
    side = report["1x2"]
    assert side["ready"] == [] and side["pending"] == 0
    assert side["free_blocks"] == side["num_blocks"]  # nothing leaked on the survivor
    assert side["metrics"]["transfers_failed"] >= 1


@pytest.mark.parametrize("transport", ["zmq", "tcp", "gloo"])
def test_receiver_killed_mid_transfer_sender_frees_its_pages(tmp_path, tiny_llama, transport):
    pair = Pair(tmp_path, tiny_llama, [[1, 1]], [[1, 1]], common={"transport": transport, "dist_timeout": 2.0},
                send={"layerwise": True, "layer_sleep": 0.4, "ack_timeout": 2.0})
    pair.start_receiver()
    try:
        spec = {**pair.send_spec, "endpoints": pair.endpoints}
        (tmp_path / "s.spec").write_text(json.dumps(spec))
        sender = subprocess.Popen([sys.executable, PEERS, "send", str(tmp_path / "s.spec")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = sender.stdout.readline()  # {"reserved": ...}: blocks reserved, pages about to stream
        assert "reserved" in line
        pair.receiver.send_signal(signal.SIGKILL)  # dies while layers are still being computed and sent
        out, err = sender.communicate(timeout=90)
        assert sender.returncode == 0, err[-2000:]
    finally:
        pair.kill()
    sent = json.loads((tmp_path / "send.json").read_text())
    assert sent["acks"]["p1x1-d1x1"] == {"ok": False, "reason": "no ack (timeout)"}
    assert sent["free_blocks"] == sent["num_blocks"]


def test_fuzzed_frames_are_dropped_and_counted_and_transfers_go_on(tmp_path, tiny_llama):
    pair = Pair(tmp_path, tiny_llama, [[1, 1]], [[1, 1]], recv={"serve_seconds": 60})
    try:
        eps = pair.start_receiver()
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(eps["1x1"][0])
        rng = random.Random(0)
        layout = KVLayout(4, 2, 16, 4, "float32")
        good = Pages(VERSION, "ghost", 0, 0, 0, (0, 2), [1, 2], "float32", [2, 2, 2, 4, 16], 2 * 2 * 2 * 4 * 16 * 4)
        junk = [
            [b""], [b"\x00"], [rng.randbytes(64)], [rng.randbytes(5000), rng.randbytes(10)],
            [encode(good)],  # header, no payload, unknown request
            [encode(good), b"short"],  # wrong size
            [encode(good)[:-3], b"x" * 1024],  # truncated header
            [b'\x83\xa4type\xa5bogus\xa1v\x01\xa3foo\x02'],  # unknown message type
            [encode(Reserve(VERSION, "r-bad", 0, -5, layout))],  # negative tokens
            [encode(Reserve(VERSION, "r-bad2", 0, 8, KVLayout(4, 2, 16, 8, "float32")))],
        ]
        for _ in range(200):
            junk.append([rng.randbytes(rng.randint(1, 300)) for _ in range(rng.randint(1, 3))])
        for frames in junk:
            s.send_multipart(frames)
        # the receiver still serves a real transfer afterwards
        pair.run_sender()
        report = pair.wait_receiver()
    finally:
        pair.kill()
    sent = json.loads((tmp_path / "send.json").read_text())
    assert sent["acks"]["p1x1-d1x1"]["ok"] is True
    m = report["1x1"]["metrics"]
    assert m.get("messages_bad", 0) >= 200
    assert m.get("reserve_refused", 0) == 2
    # only the delivered request still holds blocks (30 tokens / 4 per block), kept for decoding
    assert report["1x1"]["free_blocks"] == report["1x1"]["num_blocks"] - 8
    check_bit_identical(pair, model_spec(tiny_llama), [[1, 1]], [[1, 1]])


def _stream_of(endpoint):
    """(address, token) of a receiver rank's page stream, asked over its ZeroMQ endpoint."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        s.send(encode(StreamHello(VERSION, "fuzz")))
        assert s.poll(10_000), "no StreamInfo"
        info = decode(s.recv())
    finally:
        s.close(0)
    return connect_address(info.address, endpoint), info.token


def test_fuzzed_stream_connections_are_closed_and_counted_and_transfers_go_on(tmp_path, tiny_llama):
    """The tcp transport's stream: no token, a wrong token, random bytes after the right token, a
    header that is not Pages, a payload cut off mid-way (its transfer fails at once, its blocks are
    freed): each connection is closed and counted; the receiver serves a real transfer afterwards."""
    pair = Pair(tmp_path, tiny_llama, [[1, 1]], [[1, 1]], common={"transport": "tcp"},
                recv={"serve_seconds": 60})
    try:
        eps = pair.start_receiver()
        (family, addr), token = _stream_of(eps["1x1"][0])
        assert len(token) == 16
        rng = random.Random(1)
        layout = KVLayout(4, 2, 16, 4, "float32")
        ghost = encode(Pages(VERSION, "ghost", 0, 0, 0, (0, 2), [1, 2], "float32", [2, 2, 2, 4, 16],
                             2 * 2 * 2 * 4 * 16 * 4, runs=[2]))
        sessions = [
            b"",  # connects and goes
            rng.randbytes(16) + PREFIX.pack(MAGIC, len(ghost)) + ghost,  # wrong token
            token + rng.randbytes(3000),  # random bytes
            token + PREFIX.pack(b"XXXX", 10) + b"0123456789",  # bad magic
            token + PREFIX.pack(MAGIC, 1 << 30),  # a header larger than any
            token + PREFIX.pack(MAGIC, 7) + b"\x00" * 7,  # not msgpack
            token + PREFIX.pack(MAGIC, len(e := encode(Reserve(VERSION, "r", 0, 8, layout)))) + e,
            token + PREFIX.pack(MAGIC, len(ghost)) + ghost + b"short",  # unknown request, cut off
            token + PREFIX.pack(MAGIC, len(ghost)) + ghost + b"\x00" * (2 * 2 * 2 * 4 * 16 * 4),  # unknown, whole
        ]
        for data in sessions:
            c = socket.socket(family, socket.SOCK_STREAM)
            c.settimeout(10)
            c.connect(addr)
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            try:
                assert c.recv(1) == b""  # the receiver closes its end
            except ConnectionResetError:  # ... with bytes of ours unread
                pass
            c.close()
        pair.run_sender()
        report = pair.wait_receiver()
    finally:
        pair.kill()
    sent = json.loads((tmp_path / "send.json").read_text())
    assert sent["acks"]["p1x1-d1x1"]["ok"] is True and sent["metrics"]["messages_streamed"] > 0
    m = report["1x1"]["metrics"]
    assert m.get("stream_refused", 0) == 1
    assert m.get("messages_bad", 0) == 5  # random bytes, bad magic, huge header, not msgpack, a Reserve
    assert m.get("frames_unknown_request", 0) >= 1  # the whole ghost message, read and dropped
    assert report["1x1"]["free_blocks"] == report["1x1"]["num_blocks"] - 8
    check_bit_identical(pair, model_spec(tiny_llama), [[1, 1]], [[1, 1]])
