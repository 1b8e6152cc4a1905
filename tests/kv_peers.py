"""Sender and receiver processes for KV transfer tests (run as scripts; results to safetensors files).

    python tests/kv_peers.py receive SPEC.json   # prints {"endpoints": {...}} then serves until done
    python tests/kv_peers.py send SPEC.json      # computes KV with the engine, sends, records acks

A spec names the model, the layouts on each side and what to do; several prefill layouts and several
decode layouts live in one process each, so 16 TP x PP combinations cost two processes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine.block_manager import BlockManager  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from kvtransfer.pages import TORCH_DTYPES, RankCaches  # noqa: E402
from kvtransfer.plan import KVLayout  # noqa: E402
from kvtransfer.receiver import RankReceiver  # noqa: E402
from kvtransfer.reservations import BlockPoolReserver, Reservations  # noqa: E402
from kvtransfer.sender import SendTransfer  # noqa: E402
from kvtransfer.zmq_transport import KVClient, KVServer  # noqa: E402


def layout_of(spec, tp, pp):
    m = spec["model"]
    return KVLayout(m["num_layers"], m["num_kv_heads"], m["head_dim"], spec["block_size"], spec["dtype"], tp, pp,
                    kv_cache_dtype=spec.get("kv_cache_dtype", "auto"))


def rank_caches(full: list[torch.Tensor] | None, layout: KVLayout, rank: int, num_blocks: int) -> RankCaches:
    tp_rank, pp_rank = layout.coords(rank)
    l0, l1 = layout.layers(pp_rank)
    h0, h1 = layout.heads(tp_rank)
    if full is not None:  # the sender: views of the engine's caches
        caches = [full[layer][:, :, h0:h1] for layer in range(l0, l1)]
    else:
        caches = [torch.zeros(2, num_blocks, h1 - h0, layout.block_size, layout.row_width,
                              dtype=TORCH_DTYPES[layout.page_dtype]) for _ in range(l0, l1)]
    return RankCaches(caches, l0, h0)


class DecodeSide:
    """A decode worker's KV endpoints: one server per rank, reservations on rank 0."""

    def __init__(self, spec, tp, pp, num_blocks):
        self.layout = layout_of(spec, tp, pp)
        self.bm = BlockManager(num_blocks, spec["block_size"], enable_prefix_caching=False)
        self.pool = BlockPoolReserver(self.bm)
        self.ready: dict[str, list[int]] = {}
        self.first_frame_at: float | None = None
        self.metrics = Counter()
        self.ranks = [RankReceiver(r, self.layout, rank_caches(None, self.layout, r, num_blocks),
                                   self._rank_done, self.metrics) for r in range(self.layout.num_ranks)]
        self.res = Reservations(self.layout, self.ranks, self.pool.reserve, self.pool.release, lambda *a: None,
                                self._on_ready, timeout=spec.get("timeout", 10.0), metrics=self.metrics)
        transport = spec.get("transport", "zmq")
        backend = None if transport in ("zmq", "tcp") else transport
        self.servers = [KVServer(spec.get("endpoint", "tcp://127.0.0.1:0"), r, self.res if r.rank == 0 else None,
                                 dist_backend=backend, dist_timeout=spec.get("dist_timeout", 30.0),
                                 stream=transport == "tcp") for r in self.ranks]
        for s in self.servers:
            s.start()
        on_pages = self.ranks[0].on_pages

        def stamped(msg, payload):
            if self.first_frame_at is None:
                self.first_frame_at = time.monotonic()
            on_pages(msg, payload)
        self.ranks[0].on_pages = stamped

    def _rank_done(self, *args):
        self.res.on_rank_done(*args)

    def _on_ready(self, request_id, attempt, block_ids):
        self.ready[request_id] = block_ids

    def dump(self) -> dict[str, torch.Tensor]:
        """Received pages: for each rank, [layers, 2, blocks, heads, bs, D] of every ready request."""
        out = {}
        for rid, blocks in self.ready.items():
            bt = torch.tensor(blocks)
            for r in self.ranks:
                pages = torch.stack([c.index_select(1, bt) for c in r.caches.caches])
                out[f"{rid}/rank{r.rank}"] = pages.contiguous()
        return out


def receive(spec):
    sides = {f"{tp}x{pp}": DecodeSide(spec, tp, pp, spec["num_blocks"]) for tp, pp in spec["decode"]}
    print(json.dumps({"endpoints": {k: [s.endpoint for s in d.servers] for k, d in sides.items()},
                      "pid": os.getpid()}), flush=True)
    deadline = time.monotonic() + spec.get("serve_seconds", 60)
    expected = spec.get("expect_ready", 0)
    while time.monotonic() < deadline:
        if expected and sum(len(d.ready) for d in sides.values()) >= expected:
            break
        if sys.stdin.readable() and spec.get("stop_file") and Path(spec["stop_file"]).exists():
            break
        time.sleep(0.02)
    time.sleep(spec.get("linger", 0.0))
    from safetensors.torch import save_file
    tensors = {}
    report = {}
    for k, d in sides.items():
        tensors.update({f"{k}/{n}": t for n, t in d.dump().items()})
        report[k] = {"ready": sorted(d.ready), "free_blocks": d.bm.num_free_blocks,
                     "num_blocks": d.bm.num_blocks, "metrics": dict(d.metrics),
                     "first_frame_at": d.first_frame_at, "pending": d.res.num_pending}
    if tensors:
        save_file(tensors, spec["out"] + ".safetensors")
    Path(spec["out"] + ".json").write_text(json.dumps(report))
    for d in sides.values():
        for s in d.servers:
            s.stop()


def send(spec):
    from engine import CacheConfig, DeviceConfig, EngineConfig, LLMEngine

    eng = LLMEngine(EngineConfig(spec["model_dir"], cache=CacheConfig(block_size=spec["block_size"],
                                                                      num_blocks=spec["num_blocks"],
                                                                      kv_cache_dtype=spec.get("kv_cache_dtype", "auto")),
                                 device=DeviceConfig(dtype=spec["dtype"])))
    prompt = spec["prompt"]
    endpoints = spec["endpoints"]
    report = {"acks": {}, "layer_done_at": None, "metrics": Counter()}
    tensors = {}
    kill_after = spec.get("kill_after_frames")
    for p_tp, p_pp in spec["prefill"]:
        src = layout_of(spec, p_tp, p_pp)
        for key, eps in endpoints.items():
            d_tp, d_pp = map(int, key.split("x"))
            dst = layout_of(spec, d_tp, d_pp)
            rid = f"p{p_tp}x{p_pp}-d{key}"
            # compute the prompt's KV with the engine: one prefill step; the sequence keeps its blocks
            eng.add_request(rid, prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
            transport = spec.get("transport", "zmq")
            backend = None if transport in ("zmq", "tcp") else transport
            clients = [KVClient(r, dist_backend=backend, dist_timeout=spec.get("dist_timeout", 30.0),
                                stream=transport == "tcp") for r in range(src.num_ranks)]
            for c in clients:
                c.start()
            sleep = spec.get("layer_sleep", 0.0)
            seq = None
            transfers = []

            def layer_done(i):
                if sleep:
                    time.sleep(sleep)
                for t in transfers:
                    t.send_layer(i)

            st = SendTransfer(clients[0], rid, 0, len(prompt), src, dst, eps,
                              release=lambda rid=rid: eng.abort_request(rid),
                              ack_timeout=spec.get("ack_timeout", 10.0))
            if not st.reserve():
                report["acks"][rid] = {"ok": False, "reason": st.reason}
            else:
                print(json.dumps({"reserved": rid}), flush=True)
                out = eng.scheduler.schedule()
                seq = out.scheduled[0].seq
                for r in range(src.num_ranks):
                    transfers.append(st.outgoing(r, clients[r], rank_caches(eng.runner.kv_caches, src, r, 0),
                                                 seq.block_ids))
                if spec.get("layerwise"):
                    # layer-wise: the model calls back after each layer; pages of that layer leave at once
                    ids, pos, meta, rows = eng.runner.prepare(out.scheduled)
                    with torch.inference_mode():
                        eng.runner.model(ids, pos, eng.runner.kv_caches, meta, layer_done=layer_done)
                    report["layer_done_at"] = time.monotonic()
                else:
                    eng.scheduler.update(out, eng.runner.execute(out).sampled)
                    if kill_after is not None:
                        sent = 0
                        for layer in range(spec["model"]["num_layers"]):
                            for t in transfers:
                                sent += t.send_layer(layer)
                            if sent >= kill_after:
                                for c in clients:
                                    c.flush()
                                print(json.dumps({"killed_after": sent}), flush=True)
                                os._exit(0)
                    for t in transfers:
                        t.send_all()
                for c in clients:
                    c.flush()
                nb = len(st.dst_block_ids)
                bt = torch.tensor(seq.block_ids[:nb])
                tensors[rid] = torch.stack([c.index_select(1, bt) for c in eng.runner.kv_caches]).contiguous()
                st.finish()  # waits for the Ack; releases the pages either way
                report["acks"][rid] = {"ok": st.state.value == "done", "reason": st.reason}
            assert rid not in eng._requests, "SendTransfer must have released the request"
            for c in clients:
                c.stop()
                report["metrics"].update(c.metrics)
    report["free_blocks"] = eng.block_manager.num_free_blocks
    report["num_blocks"] = eng.block_manager.num_blocks
    from safetensors.torch import save_file
    if tensors:
        save_file(tensors, spec["out"] + ".safetensors")
    Path(spec["out"] + ".json").write_text(json.dumps(report))


if __name__ == "__main__":
    role, spec_file = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_file).read_text())
    {"receive": receive, "send": send}[role](spec)
