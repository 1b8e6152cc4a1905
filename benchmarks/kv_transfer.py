"""KV transfer throughput and latency, next to the raw limits measured in the same run.

    python benchmarks/kv_transfer.py [--sizes-mib 1 16 256] [--transports zmq gloo] [--out ...]

For each size: one request whose pages (SmolLM2's shape: 30 layers, 3 KV heads, head_dim 64, block 16,
fp32) add up to that many MiB goes from a sender to a receiver over real loopback sockets (ZeroMQ
tcp, or a gloo pair group), through the full protocol: reserve, one frame per layer, ack. Next to it:
raw pyzmq pushing the same bytes in the same number of messages with no protocol, and numpy.copyto
of the same bytes (memory bandwidth). Also: the whole transfer of one 512-token prompt's KV.
Sender and receiver are threads of one process (2 cores: a second process would only add noise).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.block_manager import BlockManager  # noqa: E402
from kvtransfer.pages import RankCaches  # noqa: E402
from kvtransfer.plan import KVLayout  # noqa: E402
from kvtransfer.receiver import BlockPoolReserver, RankReceiver, Reservations  # noqa: E402
from kvtransfer.sender import SendTransfer  # noqa: E402
from kvtransfer.zmq_transport import KVClient, KVServer  # noqa: E402

LAYERS, HEADS, HEAD_DIM, BS = 30, 3, 64, 16
BLOCK_BYTES = LAYERS * 2 * HEADS * BS * HEAD_DIM * 4


def protocol_run(nblocks: int, transport: str, repeats: int) -> list[float]:
    layout = KVLayout(LAYERS, HEADS, HEAD_DIM, BS, "float32")
    num_blocks = nblocks + 1
    pool = BlockPoolReserver(BlockManager(num_blocks, BS, enable_prefix_caching=False))

    dst = RankCaches([torch.zeros(2, num_blocks, HEADS, BS, HEAD_DIM) for _ in range(LAYERS)], 0, 0)
    src = RankCaches([torch.randn(2, num_blocks, HEADS, BS, HEAD_DIM) for _ in range(LAYERS)], 0, 0)
    metrics = Counter()
    res = None
    rank = RankReceiver(0, layout, dst, lambda *a: res.on_rank_done(*a), metrics)
    res = Reservations(layout, [rank], pool.reserve, pool.release, None, timeout=60)
    backend = None if transport == "zmq" else transport
    server = KVServer("tcp://127.0.0.1:0", rank, res, dist_backend=backend)
    server.start()
    client = KVClient(0, dist_backend=backend)
    client.start()
    times = []
    try:
        client.connect(server.endpoint)
        for i in range(repeats + 1):
            rid = f"r{i}"
            t0 = time.perf_counter()
            st = SendTransfer(client, rid, 0, nblocks * BS, layout, layout, [server.endpoint], lambda: None,
                              ack_timeout=120)
            assert st.reserve(), st.reason
            st.outgoing(0, client, src, list(range(nblocks))).send_all()
            assert st.finish(), st.reason
            if i:  # the first run warms up sockets and allocator
                times.append(time.perf_counter() - t0)
            pool.release(rid)  # a decode worker would take the blocks over here
    finally:
        client.stop()
        server.stop()
    return times


def raw_zmq(nbytes: int, messages: int, repeats: int) -> list[float]:
    ctx = zmq.Context.instance()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    chunk = np.random.bytes(nbytes // messages)
    times = []
    for i in range(repeats + 1):
        done = threading.Event()

        def sink():
            for _ in range(messages):
                pull.recv(copy=False)
            done.set()
        th = threading.Thread(target=sink)
        th.start()
        t0 = time.perf_counter()
        for _ in range(messages):
            push.send(chunk, copy=False)
        done.wait(120)
        th.join()
        if i:
            times.append(time.perf_counter() - t0)
    pull.close(0)
    push.close(0)
    return times


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mib", type=float, nargs="+", default=[1, 16, 256])
    ap.add_argument("--transports", nargs="+", default=["zmq", "gloo"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_results/kv_transfer.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from engine.platform import tune_cpu_allocator
    tune_cpu_allocator()
    rows = []
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    for mib in args.sizes_mib:
        nblocks = max(1, round(mib * 2**20 / BLOCK_BYTES))
        nbytes = nblocks * BLOCK_BYTES
        raw = med(raw_zmq(nbytes, LAYERS, args.repeats))
        cp = med(memcpy(nbytes, args.repeats))
        row = {"size_mib": round(nbytes / 2**20, 2), "blocks": nblocks,
               "raw_zmq_gb_s": round(nbytes / raw / 1e9, 2), "memcpy_gb_s": round(nbytes / cp / 1e9, 2)}
        for tr in args.transports:
            t = med(protocol_run(nblocks, tr, args.repeats))
            row[f"{tr}_gb_s"] = round(nbytes / t / 1e9, 2)
            row[f"{tr}_ms"] = round(t * 1e3, 2)
            row[f"{tr}_vs_raw_zmq"] = round(raw / t, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    prompt_blocks = 512 // BS
    prompt = {tr: round(med(protocol_run(prompt_blocks, tr, args.repeats)) * 1e3, 2) for tr in args.transports}
    print(json.dumps({"512_token_prompt_ms": prompt, "bytes": prompt_blocks * BLOCK_BYTES}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"sizes": rows, "prompt_512_ms": prompt}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
