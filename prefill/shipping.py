"""The prefill worker's KV connector, on every rank (engine/connector.py): ship each layer's KV pages
to the decode ranks as soon as the layer is computed, each rank its own shard, per the transfer plan.
The driver's scheduler side names what to ship in a ShipPlan (kvtransfer/connector.py)."""

from __future__ import annotations

from engine.connector import ForwardHooks, KVConnector
from engine.partition import kv_head_range
from kvtransfer.connector import DataPath, decode_plan
from kvtransfer.outgoing import OutgoingTransfer
from kvtransfer.pages import RankCaches
from kvtransfer.plan import KVLayout, model_digest, plan_transfer
from kvtransfer.transport import KVTransport
from kvtransfer.zmq_transport import KVClient


def src_layout(runner) -> KVLayout:
    cfg, ctx = runner.model_cfg, runner.model.ctx
    return KVLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, runner.block_size,
                    str(runner.dtype).removeprefix("torch."), ctx.tp_size, ctx.pp_size,
                    kv_cache_dtype=runner.kv_spec.kv_cache_dtype, model_id=model_digest(cfg))


def make_client(rank: int, path: DataPath) -> KVClient:
    return KVClient(rank, dist_backend=path.backend, device=path.device, dist_timeout=path.timeout_s,
                    stream=path.stream)


class _LayerShipper(ForwardHooks):
    """One forward's transfers: a layer's pages leave as soon as it is computed."""

    def __init__(self, transfers: list[OutgoingTransfer], layer_start: int):
        self.transfers, self.layer_start = transfers, layer_start

    def on_layer_done(self, layer: int) -> None:
        for t in self.transfers:
            t.send_layer(self.layer_start + layer)

    def finish(self) -> None:
        # every layer was reported as it finished; a forward that reports none (no per-layer hooks in
        # the model) still ships everything here, in as few messages as the transport packs
        for t in self.transfers:
            t.send_all()


class Shipper(KVConnector):
    def __init__(self):
        self.client: KVTransport | None = None
        self._caches: tuple | None = None  # (runner, its RankCaches): byte views made once, not per step

    def start_forward(self, rank: int, runner, plan: bytes, seq_ids: list[int]) -> ForwardHooks | None:
        ship = decode_plan(plan)
        mine = set(seq_ids)
        items = [it for it in ship.items if it.seq_id in mine]
        if not items:
            return None
        if self.client is None:  # the transport is the worker's: the same in every step
            self.client = make_client(rank, ship.path)
            self.client.start()
        src = src_layout(runner)
        ctx = runner.model.ctx
        if self._caches is None or self._caches[0] is not runner:
            self._caches = (runner, RankCaches(runner.kv_caches, runner.model.layer_start,
                                               kv_head_range(src.num_kv_heads, ctx.tp_size, ctx.tp_rank)[0]))
        caches = self._caches[1]
        transfers = [OutgoingTransfer(self.client, caches, plan_transfer(src, KVLayout.from_spec(it.dst_layout)),
                                      rank, it.request_id, it.attempt, it.dst_endpoints, it.src_block_ids,
                                      it.dst_block_ids) for it in items]
        return _LayerShipper(transfers, runner.model.layer_start)

    def close(self) -> None:
        if self.client is not None:
            self.client.stop()
