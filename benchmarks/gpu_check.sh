#!/usr/bin/env bash
# GPU checks: one prepared script for a lent GPU machine (device tool), ~10 minutes on one GPU.
# Results go to $OUT (or ./bench_results).
#   1. CUDA correctness: greedy equals transformers (fp32), bf16 batched sampling (tests -m gpu)
#   2. offline throughput on CUDA, tandem vs transformers, bf16, on a random-weight model of
#      SmolLM2's shape (the SmolLM2 wheel is larger than what travels to that machine)
#   3. KV transfer over ZeroMQ frames and the tcp stream with CUDA caches on both ends (pinned staging buffers), next to raw pyzmq and a pinned
#      device-to-host copy. NCCL pairs need two GPUs; one is lent, so the NCCL path is not run.
# Python packages missing there travel as wheels in .whl (see the device tool's README).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench_results}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH="${PYTHONPATH:-$PWD}"
python3 -c "import torch; assert torch.cuda.is_available(); print(torch.__version__, torch.cuda.get_device_name())" || exit 1
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/gpu_tests.log" | tail -5
python3 - <<'PY'
import sys; sys.path.insert(0, "tests")
from pathlib import Path
from helpers import make_tiny_model
make_tiny_model(Path("/tmp/smol-shape"), "llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                tie_word_embeddings=True)
PY
timeout 240 python3 benchmarks/offline_throughput.py --device cuda --model /tmp/smol-shape --dtypes bfloat16 \
  --concurrency 1 32 --peers transformers --int8-up-to 0 --out "$out/offline_throughput_cuda.json" 2>&1 | tail -12
timeout 150 python3 benchmarks/kv_transfer.py --device cuda --transports tcp zmq --sizes-mib 16 256 \
  --out "$out/kv_transfer_cuda.json" 2>&1 | tail -4
