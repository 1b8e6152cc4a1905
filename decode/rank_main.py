"""A follower rank of a TP x PP decode worker: its own KV server (frames for its shard land in its
cache), RankDone reports to the driver, and the engine's follower loop."""

import sys

from engine.executor import exchange_strings
from engine.partition import kv_head_range
from engine.rank_main import main
from kvtransfer.pages import RankCaches
from kvtransfer.plan import KVLayout
from kvtransfer.receiver import RankReceiver
from kvtransfer.zmq_transport import FollowerLink, KVServer


def start_kv_server(rt, config) -> None:
    from decode.worker import kv_dist_args

    runner = rt.runner
    layout = KVLayout.of(runner.model_cfg, config)
    ctx = runner.model.ctx
    caches = RankCaches(runner.kv_caches, runner.model.layer_start,
                        kv_head_range(layout.num_kv_heads, ctx.tp_size, ctx.tp_rank)[0])
    link = None
    receiver = RankReceiver(rt.rank, layout, caches, lambda *a: link.report(*a))
    server = KVServer(f"tcp://{config.kv_transfer.host}:0", receiver, None, **kv_dist_args(config))
    driver_endpoint = exchange_strings(server.endpoint, rt.rank, rt.tp * rt.pp)[0]
    link = FollowerLink(server, driver_endpoint)
    server.start()
    rt.kv_server = server  # kept alive with the rank


if __name__ == "__main__":
    sys.exit(main(on_ready=start_kv_server))
