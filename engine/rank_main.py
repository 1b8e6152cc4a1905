"""A follower rank of a TP x PP model replica: `python -m engine.rank_main RANK INIT_METHOD CONFIG_JSON`.

Started by the driver (engine/executor.py::start_parallel); runs the follower loop until the driver
says shutdown, or exits when the driver is gone (its collective fails or times out): a worker never
runs half-alive.
"""

import gc
import logging
import os
import sys


def main(connector=None, on_ready=None) -> int:
    """`connector`: the owning worker's KV connector on this rank (engine/connector.py; prefill: ships KV).
    `on_ready(rt, config)`: the worker's set-up of this rank before the step loop (decode: KV server)."""
    rank, init, cfg_json = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    from engine.config import ModelConfig
    from engine.executor import config_from_json, follower_loop, init_rank
    from engine.platform import setup_process

    config = config_from_json(cfg_json)
    setup_process(config.device.device, config.device.num_threads, config.device.tune_malloc)
    model_cfg = ModelConfig.from_dir(config.model).with_context_limit(config.scheduler.max_model_len)  # as the driver's
    rt = init_rank(config, rank, init, model_cfg, connector=connector)
    parent = os.getppid()
    try:
        if on_ready is not None:
            on_ready(rt, config)
        gc.collect()
        gc.freeze()  # as the driver does (engine/llm_engine.py)
        follower_loop(rt)
    except RuntimeError as e:  # the driver or another rank died: go down with the worker
        logging.getLogger(__name__).error("leaving: %s (driver pid %d)", e, parent)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
