"""One rank of a TP x PP model replica (a test helper; run one process per rank).

    python tests/mp_ranks.py RANK TP PP PORT MODEL_DIR STEPS OUT_PREFIX

Every rank builds its shard of the model (ParallelContext, gloo), prefills a fixed prompt and decodes
STEPS greedy tokens: stage s sends its hidden states to stage s + 1, the last stage's TP rank 0
picks the token and broadcasts it. That rank writes the tokens and the logits it saw to OUT_PREFIX.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from engine.block_manager import BlockManager  # noqa: E402
from engine.config import CacheConfig, DeviceConfig, ModelConfig  # noqa: E402
from engine.model_runner import ModelRunner  # noqa: E402
from engine.parallel import ParallelContext  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.scheduler import ScheduledSeq  # noqa: E402
from engine.sequence import Sequence  # noqa: E402

PROMPT = [5, 17, 42, 99, 123, 7, 8, 200, 31, 64, 77, 150, 3, 9]


def main():
    rank, tp, pp, port = map(int, sys.argv[1:5])
    model_dir, steps, out = sys.argv[5], int(sys.argv[6]), sys.argv[7]
    torch.set_num_threads(1)
    world = tp * pp
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    groups = [dist.new_group([p * tp + t for t in range(tp)]) for p in range(pp)]
    tp_rank, pp_rank = rank % tp, rank // tp
    ctx = ParallelContext(tp_rank, tp, pp_rank, pp, groups[pp_rank])
    cfg = ModelConfig.from_dir(model_dir)
    # fp32: the shards' logits are held to the single process's within 1e-4
    runner = ModelRunner(cfg, CacheConfig(block_size=4), DeviceConfig(dtype="float32"), ctx=ctx, num_blocks=32)
    model = runner.model
    bm = BlockManager(32, 4, enable_prefix_caching=False)
    seq = Sequence("r", 0, list(PROMPT), len(PROMPT), SamplingParams(max_tokens=steps))
    last_stage_leader = (pp - 1) * tp
    tokens, all_logits = [], []
    for _ in range(steps):
        start = seq.num_computed_tokens
        n = seq.num_tokens - start
        assert bm.allocate_slots(seq, n)
        ids, pos, meta, rows = runner.prepare([ScheduledSeq(seq, start, n, True)])
        with torch.inference_mode():
            hidden = None
            if pp_rank > 0:
                hidden = torch.empty(len(ids), cfg.hidden_size)
                dist.recv(hidden, src=rank - tp)
            h = model(ids if pp_rank == 0 else None, pos, runner.kv_caches, meta, hidden=hidden)
            if pp_rank < pp - 1:
                dist.send(h.contiguous(), dst=rank + tp)
                token = torch.zeros(1, dtype=torch.long)
            else:
                logits = model.compute_logits(h[rows[0][1]:rows[0][1] + 1])[0]
                all_logits.append(logits)
                token = logits.argmax().view(1)
        dist.broadcast(token, src=last_stage_leader)
        seq.num_computed_tokens = start + n
        seq.token_ids.append(int(token))
        tokens.append(int(token))
    if rank == last_stage_leader:
        from safetensors.torch import save_file
        save_file({"tokens": torch.tensor(tokens), "logits": torch.stack(all_logits)}, out + ".safetensors")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
