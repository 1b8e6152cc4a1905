"""KV transfer throughput and latency, next to the raw limits measured in the same run.

    python benchmarks/kv_transfer.py [--sizes-mib 1 16 256] [--transports tcp zmq gloo] [--out ...]

For each size: one request whose pages (SmolLM2's shape: 30 layers, 3 KV heads, head_dim 64, block 16,
fp32) add up to that many MiB goes from a sender to a receiver over real loopback sockets (the tcp
transport: ZeroMQ control, pages on a plain stream socket; ZeroMQ frames; or a gloo pair group), through
the full protocol: reserve, pages, ack. Next to it:
raw pyzmq pushing the same bytes in the same number of messages with no protocol (the sink only looks
at each frame: `raw_zmq`; or receives each into a buffer of its own, as pages must land in cache blocks:
`raw_zmq_into`; or every frame into one buffer that stays in the CPU's caches: `raw_zmq_into_hot`),
a plain TCP socket carrying the same bytes, received with recv_into into buffers of their own
(`raw_socket_into`: what the tcp transport's stream can reach), and numpy.copyto of the same bytes
(memory bandwidth). Also: the whole transfer of one 512-token prompt's KV,
and what streaming it adds to TTFT: SmolLM2 prefilling the prompt alone vs while each layer's pages are
sent as soon as the layer is computed, up to the receiver's ack (`streamed_prompt_run`).
The receiver (and the raw sink) runs in a second process, as a decode worker would.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.block_manager import BlockManager  # noqa: E402
from kvtransfer.pages import RankCaches  # noqa: E402
from kvtransfer.plan import KVLayout  # noqa: E402
from kvtransfer.receiver import RankReceiver  # noqa: E402
from kvtransfer.reservations import BlockPoolReserver, Reservations  # noqa: E402
from kvtransfer.sender import SendTransfer  # noqa: E402
from kvtransfer.zmq_transport import KVClient, KVServer  # noqa: E402

LAYERS, HEADS, HEAD_DIM, BS = 30, 3, 64, 16
BLOCK_BYTES = LAYERS * 2 * HEADS * BS * HEAD_DIM * 4


def _backend(transport: str) -> str | None:
    return None if transport in ("zmq", "tcp") else transport


def serve(transport: str, num_blocks: int, device: str = "cpu") -> None:
    """The receiver process: a decode rank's KV server; prints its endpoint, serves until stdin closes."""
    torch.set_num_threads(1)
    from engine.platform import tune_cpu_allocator
    tune_cpu_allocator()
    layout = KVLayout(LAYERS, HEADS, HEAD_DIM, BS, "float32")
    pool = BlockPoolReserver(BlockManager(num_blocks, BS, enable_prefix_caching=False))
    dst = RankCaches([torch.zeros(2, num_blocks, HEADS, BS, HEAD_DIM, device=device) for _ in range(LAYERS)], 0, 0)
    res = None
    rank = RankReceiver(0, layout, dst, lambda *a: res.on_rank_done(*a))
    # a decode worker takes the blocks over once the KV is in; here they go straight back
    res = Reservations(layout, [rank], pool.reserve, pool.release, None,
                       on_ready=lambda rid, attempt, blocks: pool.release(rid), timeout=120)
    server = KVServer("tcp://127.0.0.1:0", rank, res, dist_backend=_backend(transport), device=device,
                      stream=transport == "tcp")
    server.start()
    print(server.endpoint, flush=True)
    sys.stdin.read()
    server.stop()
    print(json.dumps(dict(rank.metrics)), file=sys.stderr, flush=True)


def raw_sink(messages: int, into: bool | str = False) -> None:
    """The raw baseline's receiver process: PULL `messages` frames, then say so; forever. `into`:
    each frame is received into a buffer of its own (as pages land in cache blocks), which costs a
    copy out of libzmq's receive buffer; "hot": every frame into the same one (the copy alone, its
    destination in the CPU's caches); otherwise frames are only looked at (no copy)."""
    ctx = zmq.Context.instance()
    pull, done = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    print(port, flush=True)
    done.connect(sys.stdin.readline().strip())
    dst: list = [None] * messages
    while True:
        for i in range(messages):
            if not into:
                pull.recv(copy=False)
                continue
            if into == "hot" and i and dst[0] is not None:
                pull.recv_into(dst[0])
                continue
            if dst[i] is None:
                dst[i] = np.zeros(len(pull.recv(copy=False)), dtype=np.uint8)  # first round: sizes
            else:
                pull.recv_into(dst[i])
        done.send(b"ok")


def raw_socket_sink(messages: int) -> None:
    """The raw socket baseline's receiver process: accepts one connection; then forever: reads the
    sizes of `messages` messages once, then each round receives every message into a buffer of its own
    (recv_into, as pages land in cache blocks, RECV_CHUNK a read as the tcp transport reads) and
    answers one byte."""
    from kvtransfer.stream import RECV_CHUNK, _tune
    ls = socket.socket()
    _tune(ls)
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    print(ls.getsockname()[1], flush=True)
    conn, _ = ls.accept()
    sizes = np.frombuffer(conn.recv(8 * messages, socket.MSG_WAITALL), dtype=np.int64)
    dst = [memoryview(np.zeros(int(n), dtype=np.uint8)) for n in sizes]
    while True:
        for d in dst:
            got = 0
            while got < len(d):
                k = conn.recv_into(d[got:got + RECV_CHUNK])
                if not k:
                    return
                got += k
        conn.sendall(b"k")


def _child(*args) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    return p, p.stdout.readline().strip()


class ProtocolRun:
    """One request's pages through the whole protocol to a receiver process. `once()` -> (whole,
    transfer) seconds: the whole is reserve + pages + ack; the transfer, pages + ack (a worker
    reserves before it computes the prompt, so only this part can hold up a token). Bulk: all layers
    handed over at once (`send_all`: layers coalesce into messages of ~MESSAGE_BYTES); `layerwise`: one
    `send_layer` call per layer, as a streaming prefill makes them (one message per layer)."""

    def __init__(self, nblocks: int, transport: str, device: str = "cpu", layerwise: bool = False):
        self.nblocks, self.layout = nblocks, KVLayout(LAYERS, HEADS, HEAD_DIM, BS, "float32")
        self.layerwise = layerwise
        self.child, self.endpoint = _child("serve", transport, str(nblocks + 1), device)
        self.src = RankCaches([torch.randn(2, nblocks + 1, HEADS, BS, HEAD_DIM, device=device)
                               for _ in range(LAYERS)], 0, 0)
        self.client = KVClient(0, dist_backend=_backend(transport), device=device, stream=transport == "tcp")
        self.client.start()
        self.client.connect(self.endpoint)
        self.n = 0

    def once(self) -> tuple[float, float]:
        self.n += 1
        t0 = time.perf_counter()
        st = SendTransfer(self.client, f"r{self.n}", 0, self.nblocks * BS, self.layout, self.layout,
                          [self.endpoint], lambda: None, ack_timeout=120)
        assert st.reserve(), st.reason
        t1 = time.perf_counter()
        out = st.outgoing(0, self.client, self.src, list(range(self.nblocks)))
        if self.layerwise:
            for layer in range(LAYERS):
                out.send_layer(layer)
        else:
            out.send_all()
        assert st.finish(), st.reason
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1

    def close(self) -> None:
        self.client.stop()
        self.child.stdin.close()
        self.child.wait(30)


def streamed_prompt_run(transport: str, repeats: int, prompt_tokens: int = 512, threads: int = 1) -> dict:
    """What shipping a prompt's KV adds to its TTFT: SmolLM2 (fp32, the receiver's layout) prefills a
    prompt in this process as a prefill worker does (`threads` torch threads, 1 by default as in a
    worker), alone, then with each layer's pages sent as soon as the layer is computed (the prefill
    step hook's path) and the receiver's ack awaited. Tail: from the end of the step to the ack (what no
    compute hides); added: median(streamed) - median(alone)."""
    from engine import CacheConfig, DeviceConfig, EngineConfig, LLMEngine, SamplingParams
    from engine.connector import ForwardHooks, KVConnector
    from engine.model_store import pull_default

    layout = KVLayout(LAYERS, HEADS, HEAD_DIM, BS, "float32")
    child, endpoint = _child("serve", transport, str(2 * prompt_tokens // BS + 1), "cpu")
    client = KVClient(0, dist_backend=_backend(transport), stream=transport == "tcp")
    client.start()
    caches: list = []

    class Layers(ForwardHooks):
        def __init__(self, out):
            self.out = out

        def on_layer_done(self, layer):
            self.out.send_layer(layer)

        def finish(self):
            self.out.send_all()

    class Connector(KVConnector):
        """The step's plan names the prompt's blocks; the transfer is the one the loop below reserved."""
        transfer = None

        def start_forward(self, rank, runner, plan, seq_ids):
            if not caches:
                caches.append(RankCaches(runner.kv_caches, 0, 0))
            return Layers(self.transfer.outgoing(0, client, caches[0], msgspec.msgpack.decode(plan)))

    connector = Connector()

    eng = LLMEngine(EngineConfig(str(pull_default(progress=False)),
                                 cache=CacheConfig(kv_cache_memory=64 * 2**20, enable_prefix_caching=False),
                                 device=DeviceConfig(dtype="float32", num_threads=threads)), connector=connector)
    rng = np.random.default_rng(0)
    one = SamplingParams(max_tokens=1, temperature=0)
    alone, streamed, tails = [], [], []
    try:
        client.connect(endpoint)
        for i in range(repeats + 1):
            eng.add_request(f"a{i}", rng.integers(100, 20000, prompt_tokens).tolist(), one)
            t0 = time.perf_counter()
            eng.step()
            t_alone = time.perf_counter() - t0
            st = SendTransfer(client, f"s{i}", 0, prompt_tokens, layout, layout, [endpoint], lambda: None,
                              ack_timeout=120)
            assert st.reserve(), st.reason  # a worker reserves before it computes the prompt
            eng.add_request(f"s{i}", rng.integers(100, 20000, prompt_tokens).tolist(), one)
            t0 = time.perf_counter()
            connector.transfer = st
            eng.step(plan_kv=lambda out: msgspec.msgpack.encode(list(out.scheduled[0].seq.block_ids)))
            t1 = time.perf_counter()
            assert st.finish(), st.reason
            t2 = time.perf_counter()
            assert not eng.has_unfinished_requests()
            if i:
                alone.append(t_alone)
                streamed.append(t2 - t0)
                tails.append(t2 - t1)
    finally:
        client.stop()
        child.stdin.close()
        child.wait(30)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    # tail: from the end of the prefill step (first token sampled) to the receiver's ack, the part of
    # the transfer that no compute hides; added: the whole difference, contention included (noisy:
    # the prefill alone varies by more than the tail from run to run)
    return {"prefill_ms": round(med(alone) * 1e3, 2), "prefill_and_transfer_ms": round(med(streamed) * 1e3, 2),
            "tail_ms": round(med(tails) * 1e3, 2), "added_ms": round((med(streamed) - med(alone)) * 1e3, 2)}


class RawRun:
    """pyzmq pushing the same bytes in the same number of messages to a sink process, no protocol.
    `once()` -> seconds until the sink says it has them all."""

    def __init__(self, nbytes: int, messages: int, into: bool | str = False):
        ctx = zmq.Context.instance()
        self.done = ctx.socket(zmq.PULL)
        done_port = self.done.bind_to_random_port("tcp://127.0.0.1")
        self.child, port = _child("sink", str(messages), "hot" if into == "hot" else "into" if into else "look")
        self.child.stdin.write(f"tcp://127.0.0.1:{done_port}\n")
        self.child.stdin.flush()
        self.push = ctx.socket(zmq.PUSH)
        self.push.connect(f"tcp://127.0.0.1:{port}")
        # distinct memory for every message, as a cache's layers are (one buffer sent 30 times would
        # stay in the CPU's caches and flatter the baseline)
        self.chunks = [np.frombuffer(np.random.bytes(nbytes // messages), dtype=np.uint8) for _ in range(messages)]

    def once(self) -> float:
        t0 = time.perf_counter()
        for chunk in self.chunks:
            self.push.send(chunk, copy=False)
        if not self.done.poll(120_000):
            raise TimeoutError("raw sink did not answer")
        self.done.recv()
        return time.perf_counter() - t0

    def close(self) -> None:
        self.child.kill()
        self.child.wait(10)
        self.push.close(0)
        self.done.close(0)


class RawSocketRun:
    """A plain TCP socket carrying the same bytes in the same number of messages (one sendmsg each) to
    a sink process that receives each into a buffer of its own. `once()` -> seconds until it says so."""

    def __init__(self, nbytes: int, messages: int):
        from kvtransfer.stream import _tune
        self.child, port = _child("socket_sink", str(messages))
        self.chunks = [np.frombuffer(np.random.bytes(nbytes // messages), dtype=np.uint8) for _ in range(messages)]
        self.sock = socket.create_connection(("127.0.0.1", int(port)), timeout=120)
        _tune(self.sock)
        self.sock.sendall(np.array([len(c) for c in self.chunks], dtype=np.int64).tobytes())

    def once(self) -> float:
        t0 = time.perf_counter()
        for chunk in self.chunks:
            self.sock.sendall(chunk)
        if self.sock.recv(1) != b"k":
            raise RuntimeError("raw socket sink went away")
        return time.perf_counter() - t0

    def close(self) -> None:
        self.sock.close()
        self.child.kill()
        self.child.wait(10)


def interleaved(runs: dict, repeats: int) -> dict[str, list]:
    """Each run's `once()` in turn, `repeats` rounds after one warm-up round: on a shared VM whose speed
    drifts, every system then sees the same stretches of time, so ratios are fair."""
    out: dict[str, list] = {name: [] for name in runs}
    try:
        for i in range(repeats + 1):
            for name, run in runs.items():
                r = run.once()
                if i:  # the first round warms up sockets and allocators
                    out[name].append(r)
    finally:
        for run in runs.values():
            run.close()
    return out


def memcpy(nbytes: int, repeats: int) -> list[float]:
    a = np.random.bytes(nbytes)
    src = np.frombuffer(a, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return times


def cuda_copy(nbytes: int, repeats: int) -> list[float]:
    """The raw limit for pages leaving a GPU: device-to-pinned-host copies of the same bytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        return serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    if len(sys.argv) > 1 and sys.argv[1] == "socket_sink":
        return raw_socket_sink(int(sys.argv[2]))
    if len(sys.argv) > 1 and sys.argv[1] == "sink":
        return raw_sink(int(sys.argv[2]), {"into": True, "hot": "hot"}.get(sys.argv[3], False))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mib", type=float, nargs="+", default=[1, 16, 256])
    ap.add_argument("--transports", nargs="+", default=["tcp", "zmq", "gloo"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu", help="where both ends keep their KV cache (cpu, cuda)")
    ap.add_argument("--out", default="bench_results/kv_transfer.json")
    ap.add_argument("--no-model", action="store_true",
                    help="skip the TTFT run (SmolLM2 prefilling a 512-token prompt while its KV streams out)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from engine.platform import tune_cpu_allocator
    tune_cpu_allocator()
    rows = []
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    for mib in args.sizes_mib:
        nblocks = max(1, round(mib * 2**20 / BLOCK_BYTES))
        nbytes = nblocks * BLOCK_BYTES
        runs = {"raw": RawRun(nbytes, LAYERS), "raw_into": RawRun(nbytes, LAYERS, into=True),
                "raw_into_hot": RawRun(nbytes, LAYERS, into="hot"), "raw_socket": RawSocketRun(nbytes, LAYERS)}
        runs.update({tr: ProtocolRun(nblocks, tr, args.device) for tr in args.transports})
        # the message shape of a streaming prefill (gloo: one layer a message anyway)
        layerwise = [tr for tr in args.transports if tr in ("tcp", "zmq")]
        for tr in layerwise:
            runs[f"{tr}_layerwise"] = ProtocolRun(nblocks, tr, args.device, layerwise=True)
        res = interleaved(runs, args.repeats)
        raw, raw_into = med(res["raw"]), med(res["raw_into"])
        cp = med(memcpy(nbytes, args.repeats))
        row = {"size_mib": round(nbytes / 2**20, 2), "blocks": nblocks, "device": args.device,
               "raw_zmq_gb_s": round(nbytes / raw / 1e9, 2), "raw_zmq_into_gb_s": round(nbytes / raw_into / 1e9, 2),
               "raw_zmq_into_hot_gb_s": round(nbytes / med(res["raw_into_hot"]) / 1e9, 2),
               "raw_socket_into_gb_s": round(nbytes / med(res["raw_socket"]) / 1e9, 2),
               "memcpy_gb_s": round(nbytes / cp / 1e9, 2)}
        if args.device.startswith("cuda"):
            row["cuda_d2h_pinned_gb_s"] = round(nbytes / med(cuda_copy(nbytes, args.repeats)) / 1e9, 2)
        for tr in [*args.transports, *(f"{t}_layerwise" for t in layerwise)]:
            whole, transfer = [w for w, _ in res[tr]], [x for _, x in res[tr]]
            t, x = med(whole), med(transfer)
            row[f"{tr}_gb_s"] = round(nbytes / t / 1e9, 2)
            row[f"{tr}_ms"] = round(t * 1e3, 2)
            row[f"{tr}_vs_raw_zmq"] = round(raw / t, 2)
            row[f"{tr}_transfer_ms"] = round(x * 1e3, 2)
            row[f"{tr}_transfer_vs_raw_zmq"] = round(raw / x, 2)
            row[f"{tr}_transfer_vs_raw_zmq_into"] = round(raw_into / x, 2)
            # the same ratio taken round by round (each round's raw and transfer ran back to back)
            row[f"{tr}_transfer_vs_raw_zmq_per_round"] = round(med([r / x_ for r, x_ in zip(res["raw"], transfer)]), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    prompt_blocks = 512 // BS
    res = interleaved({tr: ProtocolRun(prompt_blocks, tr, args.device) for tr in args.transports}, args.repeats)
    prompt = {tr: round(med([w for w, _ in res[tr]]) * 1e3, 2) for tr in args.transports}
    print(json.dumps({"512_token_prompt_ms": prompt, "bytes": prompt_blocks * BLOCK_BYTES}))
    ttft = {}
    if not args.device.startswith("cuda") and not args.no_model:
        ttft = {tr: streamed_prompt_run(tr, args.repeats) for tr in args.transports}
        print(json.dumps({"512_token_prompt_added_ttft": ttft}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"sizes": rows, "prompt_512_ms": prompt, "prompt_512_added_ttft": ttft},
                                         indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
