"""The prefill step hook, run by every rank of a prefill worker: ship each layer's KV pages to the
decode ranks as soon as the layer is computed (each rank sends its own shard, per the transfer plan)."""

from __future__ import annotations

from engine.partition import kv_head_range
from kvtransfer.outgoing import OutgoingTransfer
from kvtransfer.pages import RankCaches
from kvtransfer.plan import KVLayout, plan_transfer
from kvtransfer.transport import KVTransport
from kvtransfer.zmq_transport import KVClient


def src_layout(runner) -> KVLayout:
    cfg, ctx = runner.model_cfg, runner.model.ctx
    return KVLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, runner.block_size,
                    str(runner.dtype).removeprefix("torch."), ctx.tp_size, ctx.pp_size)


class Shipper:
    """`step_hook(rank, runner, extras, seq_ids)`: extras["ships"] lists the requests whose prompt
    completes in this step (seq_id, request_id, attempt, dst_layout, dst_endpoints, src_block_ids,
    dst_block_ids); extras["dist"] the transport ({backend: torch.distributed or None for ZeroMQ,
    device, timeout_s, stream: pages on the tcp transport's stream}); a forward over `seq_ids` (one micro-batch) ships the ones it computes."""

    def __init__(self):
        self.client: KVTransport | None = None
        self._caches: tuple | None = None  # (runner, its RankCaches): byte views made once, not per step

    def __call__(self, rank: int, runner, extras: dict, seq_ids: list[int]):
        mine = set(seq_ids)
        ships = [s for s in extras.get("ships", ()) if s["seq_id"] in mine] if extras else None
        if not ships:
            return None
        if self.client is None:  # the transport is the worker's: the same in every step
            dist = extras.get("dist") or {}
            self.client = KVClient(rank, dist_backend=dist.get("backend"), device=dist.get("device", "cpu"),
                                   dist_timeout=dist.get("timeout_s", 30.0), stream=dist.get("stream", False))
            self.client.start()
        src = src_layout(runner)
        ctx = runner.model.ctx
        if self._caches is None or self._caches[0] is not runner:
            self._caches = (runner, RankCaches(runner.kv_caches, runner.model.layer_start,
                                               kv_head_range(src.num_kv_heads, ctx.tp_size, ctx.tp_rank)[0]))
        caches = self._caches[1]
        transfers = [OutgoingTransfer(self.client, caches, plan_transfer(src, KVLayout(**s["dst_layout"])), rank,
                                      s["request_id"], s["attempt"], s["dst_endpoints"], s["src_block_ids"],
                                      s["dst_block_ids"]) for s in ships]
        start = runner.model.layer_start

        def layer_done(i: int) -> None:
            for t in transfers:
                t.send_layer(start + i)
        return layer_done

    def close(self) -> None:
        if self.client is not None:
            self.client.stop()
