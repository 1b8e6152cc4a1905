"""Prefill and decode workers as real processes on loopback: disaggregated output equals the
single-process engine's, concurrent requests all complete, aborts and refusals free everything."""

import functools
import json
import os
import random
import subprocess
import sys
import time

import pytest

from common.sampling import SamplingSpec
from common.worker_client import WorkerClient
from engine import CacheConfig, DeviceConfig, EngineConfig, LLMEngine, SamplingParams

pytestmark = pytest.mark.integration
GREEDY = {"temperature": 0.0, "ignore_eos": True}


class Worker:
    def __init__(self, model_dir, role, *extra, wait: bool = True):
        """`wait=False`: return at once (workers started so load side by side); `info` waits for the
        ready line."""
        # stderr goes to a file, not a pipe: nobody reads it while the worker runs, and a full pipe
        # would block the worker (and its rank processes, which inherit it)
        import tempfile
        self.log = tempfile.NamedTemporaryFile(prefix=f"tandem-{role}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "worker", "--role", role, "--model",
                                      str(model_dir), "--block-size", "4", *extra],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._info: dict | None = None
        if wait:
            _ = self.info

    @property
    def info(self) -> dict:
        if self._info is None:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(self.stderr())
            self._info = json.loads(line)
        return self._info

    def stderr(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-3000:]

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        assert lines, self.stderr()
        return lines[-1]


@pytest.fixture
def spawn():
    """start(model_dir, role, *flags) -> Worker; every worker still running afterwards is killed."""
    started = []

    def start(model_dir, role, *extra, wait=True):
        w = Worker(model_dir, role, *extra, wait=wait)
        started.append(w)
        return w
    yield start
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait(10)
        w.log.close()
        os.unlink(w.log.name)


@pytest.fixture
def cluster(spawn, tiny_llama):
    return lambda role, *extra, wait=True: spawn(tiny_llama, role, "--kv-cache-memory", "2MiB", *extra, wait=wait)


def prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(rng.randint(3, 60))] for _ in range(n)]


def run_all(prefill, ps, spec, decode=None, tag="r", timeout=60, client=None) -> WorkerClient:
    """Every prompt of `ps` as request `tag`0, `tag`1, ... through `prefill` (a worker, or a list of them
    taken in turn) and `decode` (None: the prefill worker serves it colocated), collected."""
    client = client or WorkerClient()
    workers = prefill if isinstance(prefill, list) else [prefill]
    for i, prompt in enumerate(ps):
        client.submit(workers[i % len(workers)].info, f"{tag}{i}", prompt, spec,
                      decode=decode.info if decode is not None else None)
    client.collect(timeout=timeout)
    return client


def reference(model_dir, ps, max_tokens, dtype="auto"):
    return [list(t) for t in _reference(str(model_dir), tuple(tuple(p) for p in ps), max_tokens, dtype)]


@functools.lru_cache(maxsize=16)
def _reference(model_dir, ps, max_tokens, dtype):  # the one-process run, once per prompts (parametrized tests share it)
    eng = LLMEngine(EngineConfig(model_dir, cache=CacheConfig(block_size=4, kv_cache_memory=2 * 2**20),
                                 device=DeviceConfig(dtype=dtype)))
    out = eng.generate([list(p) for p in ps], SamplingParams(max_tokens=max_tokens, **GREEDY))
    return tuple(tuple(r["outputs"][0]["token_ids"]) for r in out)


def test_one_request_equals_the_single_process_engine(cluster, tiny_llama):
    d = cluster("decode")
    p = cluster("prefill")
    ps = prompts(1, seed=1)
    client = WorkerClient()
    client.submit(p.info, "r0", ps[0], SamplingSpec(max_tokens=16, **GREEDY), decode=d.info)
    client.collect(timeout=60)
    s = client.streams["r0"]
    assert s.error == "" and s.finish_reason == "length"
    assert s.token_ids == reference(tiny_llama, ps, 16)[0]
    assert s.workers[0] == "prefill-0" and set(s.workers[1:]) == {"decode-0"}
    assert s.duplicates == 0
    ds, pst = d.stop(), p.stop()
    assert ds["free_blocks"] == ds["num_blocks"] and pst["free_blocks"] == pst["num_blocks"]


def test_prompt_logprobs_come_with_the_first_chunk_disaggregated_and_colocated(cluster, tiny_llama):
    d = cluster("decode")
    p = cluster("prefill")
    ps = prompts(2, seed=11)
    spec = SamplingSpec(max_tokens=6, prompt_logprobs=2, **GREEDY)
    client = WorkerClient()
    client.submit(p.info, "disagg", ps[0], spec, decode=d.info)
    client.submit(p.info, "coloc", ps[1], spec)
    client.collect(timeout=60)
    eng = LLMEngine(EngineConfig(str(tiny_llama), cache=CacheConfig(block_size=4, kv_cache_memory=2 * 2**20)))
    want = eng.generate(ps, SamplingParams(max_tokens=6, prompt_logprobs=2, **GREEDY))
    for rid, w in zip(["disagg", "coloc"], want):
        s = client.streams[rid]
        assert s.error == "" and s.token_ids == w["outputs"][0]["token_ids"]
        got = s.prompt_logprobs
        assert got[0] is None and len(got) == len(w["prompt_logprobs"])
        for (lp, top), ref in zip(got[1:], w["prompt_logprobs"][1:]):
            assert abs(lp - ref.logprob) < 1e-4 and [t for t, _ in top] == [t for t, _ in ref.top]
    ds, pst = d.stop(), p.stop()
    assert ds["free_blocks"] == ds["num_blocks"] and pst["free_blocks"] == pst["num_blocks"]


@pytest.mark.parametrize("num_prefill", [1, 2])
def test_many_concurrent_requests_through_prefill_and_decode(cluster, tiny_llama, num_prefill):
    d = cluster("decode", "--worker-id", "decode-0")
    ps_workers = [cluster("prefill", "--worker-id", f"prefill-{i}") for i in range(num_prefill)]
    ps = prompts(12, seed=2)
    client = run_all(ps_workers, ps, SamplingSpec(max_tokens=20, **GREEDY), d, timeout=120)
    want = reference(tiny_llama, ps, 20)
    for i in range(len(ps)):
        s = client.streams[f"r{i}"]
        assert s.error == "" and s.finish_reason == "length", s.error
        assert s.token_ids == want[i], f"request {i}"
        assert s.duplicates == 0
    stats = [w.stop() for w in [d, *ps_workers]]
    for st in stats:
        assert st["free_blocks"] == st["num_blocks"]


def test_decode_full_refuses_at_once_and_nothing_leaks(cluster, tiny_llama):
    d = cluster("decode", "--kv-cache-memory", "64KiB")  # a handful of blocks
    p = cluster("prefill")
    client = WorkerClient()
    client.submit(p.info, "big", list(range(3, 200)), SamplingSpec(max_tokens=4, **GREEDY), decode=d.info)
    client.collect(timeout=30)
    s = client.streams["big"]
    assert s.finish_reason == "error" and "no room" in s.error
    ds, pst = d.stop(), p.stop()
    assert ds["free_blocks"] == ds["num_blocks"] and pst["free_blocks"] == pst["num_blocks"]


def test_abort_mid_decode_frees_both_sides(cluster, tiny_llama):
    d = cluster("decode")
    p = cluster("prefill")
    client = WorkerClient()
    client.submit(p.info, "long", prompts(1, seed=3)[0], SamplingSpec(max_tokens=400, **GREEDY), decode=d.info)
    client.collect(timeout=30, until=lambda: len(client.streams["long"].token_ids) >= 5)
    assert len(client.streams["long"].token_ids) >= 5
    client.abort(d.info["endpoint"], "long")
    client.abort(p.info["endpoint"], "long")
    time.sleep(1.0)
    ds, pst = d.stop(), p.stop()
    assert ds["free_blocks"] == ds["num_blocks"] and pst["free_blocks"] == pst["num_blocks"]
    assert ds["metrics"].get("aborted", 0) == 1


def test_colocated_worker_serves_requests_alone(cluster, tiny_llama):
    c = cluster("colocated")
    ps = prompts(3, seed=4)
    client = run_all(c, ps, SamplingSpec(max_tokens=12, **GREEDY), tag="c")
    want = reference(tiny_llama, ps, 12)
    assert [client.streams[f"c{i}"].token_ids for i in range(3)] == want
    st = c.stop()
    assert st["free_blocks"] == st["num_blocks"]


def test_an_int8_kv_cache_disaggregated_equals_one_process_and_a_float_decode_is_refused(cluster, tiny_llama):
    """--kv-cache-dtype int8 on both sides: pages ship as the cache holds them (codes and scales) and the
    tokens equal the single-process int8 engine's. A decode worker with a float cache is refused, by name
    (its ready line, as a placement hands it over: the prefill worker refuses before it reserves anything)."""
    d = cluster("decode", "--kv-cache-dtype", "int8", wait=False)
    p = cluster("prefill", "--kv-cache-dtype", "int8", wait=False)
    fp32 = dict(d.info, layout={**d.info["layout"], "kv_cache_dtype": "auto"})
    ps = prompts(2, seed=5)
    client = WorkerClient()
    client.submit(p.info, "int8", ps[0], SamplingSpec(max_tokens=12, **GREEDY), decode=d.info)
    client.submit(p.info, "mixed", ps[1], SamplingSpec(max_tokens=12, **GREEDY), decode=fp32)
    client.collect(timeout=60)
    eng = LLMEngine(EngineConfig(str(tiny_llama), cache=CacheConfig(block_size=4, kv_cache_memory=2 * 2**20,
                                                                     kv_cache_dtype="int8")))
    want = eng.generate(ps[:1], SamplingParams(max_tokens=12, **GREEDY))[0]["outputs"][0]["token_ids"]
    s = client.streams["int8"]
    assert s.error == "" and s.token_ids == want and set(s.workers[1:]) == {"decode-0"}
    bad = client.streams["mixed"]
    assert "KV cache dtypes differ: prefill stores 'int8'" in bad.error and "decode stores 'float32'" in bad.error
    for w in (d, p):
        st = w.stop()
        assert st["free_blocks"] == st["num_blocks"]


@pytest.mark.slow
def test_smollm2_disaggregated_equals_one_process(spawn, smollm2_dir):
    d = spawn(smollm2_dir, "decode", "--kv-cache-memory", "32MiB", wait=False)  # they load while the
    p = spawn(smollm2_dir, "prefill", "--kv-cache-memory", "32MiB", wait=False)  # reference runs
    eng = LLMEngine(EngineConfig(str(smollm2_dir), cache=CacheConfig(block_size=4, kv_cache_memory=32 * 2**20)))
    tok = eng.tokenizer
    chats = ["What is the capital of France?", "Name three colors."]
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}]), add_special_tokens=False)
           for c in chats]
    want = eng.generate(ids, SamplingParams(max_tokens=24, temperature=0))
    client = WorkerClient()
    for i, x in enumerate(ids):
        client.submit(p.info, f"s{i}", x, SamplingSpec(max_tokens=24, temperature=0.0), decode=d.info)
    client.collect(timeout=120)
    for i in range(len(ids)):
        s = client.streams[f"s{i}"]
        assert s.token_ids == want[i]["outputs"][0]["token_ids"]
        assert s.text == want[i]["outputs"][0]["text"]
        assert s.finish_reason == want[i]["outputs"][0]["finish_reason"]
    assert "Paris" in client.streams["s0"].text
    for w in (d, p):
        st = w.stop()
        assert st["free_blocks"] == st["num_blocks"]


@pytest.mark.parametrize("p_shape,d_shape", [((2, 1), (1, 1)), ((1, 2), (1, 1)), ((2, 2), (1, 1)),
                                             ((1, 1), (2, 1)), ((1, 1), (1, 2)), ((2, 1), (2, 2)),
                                             ((2, 2), (1, 2))])
def test_heterogeneous_prefill_and_decode_parallelism(cluster, tiny_llama, p_shape, d_shape):
    d = cluster("decode", "--tp", str(d_shape[0]), "--pp", str(d_shape[1]), wait=False)  # both load at once
    p = cluster("prefill", "--tp", str(p_shape[0]), "--pp", str(p_shape[1]), wait=False)
    ps = prompts(4, seed=6)
    want = reference(tiny_llama, ps, 12)
    assert len(d.info["kv_endpoints"]) == d_shape[0] * d_shape[1]
    client = run_all(p, ps, SamplingSpec(max_tokens=12, **GREEDY), d, timeout=120)
    for i in range(len(ps)):
        s = client.streams[f"r{i}"]
        assert s.error == "" and s.token_ids == want[i], (i, s.error, d.stderr(), p.stderr())
    ds, pst = d.stop(), p.stop()
    assert ds["free_blocks"] == ds["num_blocks"] and pst["free_blocks"] == pst["num_blocks"]


def test_workers_register_heartbeat_and_deregister(cluster, tiny_llama, tmp_path):
    from common.registry import DirectoryRegistry
    reg = DirectoryRegistry(tmp_path / "reg", stale_after=2.0)
    d = cluster("decode", "--registry", str(tmp_path / "reg"), "--worker-id", "d0", "--heartbeat-interval", "0.02")
    p = cluster("prefill", "--registry", str(tmp_path / "reg"), "--worker-id", "p0")
    live = {w.worker_id: w for w in reg.workers()}
    assert set(live) == {"d0", "p0"}
    assert live["d0"].kv_endpoints == d.info["kv_endpoints"] and live["p0"].role == "prefill"
    assert live["d0"].kv_capacity_tokens > 0
    client = WorkerClient()
    client.submit(p.info, "r0", prompts(1)[0], SamplingSpec(max_tokens=400, **GREEDY), decode=d.info)
    seen_running = False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not seen_running:
        client.collect(timeout=0.01, until=lambda: False)
        ld = reg.load("d0")
        seen_running = ld is not None and ld.num_running == 1 and ld.steps > 0
    assert seen_running  # the decode worker's heartbeats carry its load
    client.collect(timeout=60)
    p.stop()
    assert "p0" not in {w.worker_id for w in reg.workers(live_only=False)}  # deregistered on exit
    d.proc.kill()  # no chance to deregister: its heartbeats stop and it goes stale
    d.proc.wait(10)
    time.sleep(2.5)
    assert reg.workers() == []


@pytest.mark.parametrize("when", ["mid-prefill", "mid-transfer"])
def test_abort_during_prefill_or_transfer_frees_everything(cluster, tiny_llama, when):
    d = cluster("decode")
    # a long prompt in chunks of 2 tokens: its prefill takes a couple of hundred steps
    p = cluster("prefill", "--max-num-batched-tokens", "2")
    client = WorkerClient()
    prompt = [(7 * i) % 250 + 3 for i in range(400)]
    client.submit(p.info, "a", prompt, SamplingSpec(max_tokens=50, **GREEDY), decode=d.info)
    if when == "mid-transfer":
        time.sleep(0.05)  # reserved at D, the prompt still being computed and shipped layer by layer
        client.abort(d.info["endpoint"], "a")
    else:
        client.abort(p.info["endpoint"], "a")
    client.collect(timeout=3, until=lambda: client.streams["a"].finish_reason is not None)
    time.sleep(1.0)
    ds, pst = d.stop(), p.stop()
    assert ds["free_blocks"] == ds["num_blocks"] and pst["free_blocks"] == pst["num_blocks"]
    assert ds["num_running"] == 0 and pst["num_running"] == 0
    s = client.streams["a"]
    assert s.token_ids == []  # aborted before the prompt was done: no token, and nothing decoded
    if when == "mid-transfer":
        assert pst["metrics"].get("dropped_refused") == 1  # P stopped computing when D gave up


def test_a_dead_rank_takes_its_worker_down_and_out_of_the_registry(cluster, tiny_llama, tmp_path):
    import os
    import signal

    from common.registry import DirectoryRegistry
    reg = DirectoryRegistry(tmp_path / "reg", stale_after=2.0)
    d = cluster("decode", "--tp", "2", "--registry", str(tmp_path / "reg"), "--worker-id", "d0")
    assert [w.worker_id for w in reg.workers()] == ["d0"]
    children = [int(x) for x in open(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children").read().split()]
    assert children  # its other rank
    os.kill(children[0], signal.SIGKILL)
    assert d.proc.wait(60) == 1  # the driver noticed (heartbeat collective failed) and exited
    assert reg.workers(live_only=False) == []


@pytest.mark.slow
def test_smollm2_tp3_prefill_to_pp2_decode(spawn, smollm2_dir):
    d = spawn(smollm2_dir, "decode", "--kv-cache-memory", "16MiB", "--pp", "2", wait=False)  # they load while
    p = spawn(smollm2_dir, "prefill", "--kv-cache-memory", "16MiB", "--tp", "3", wait=False)  # the reference runs
    eng = LLMEngine(EngineConfig(str(smollm2_dir), cache=CacheConfig(block_size=4, kv_cache_memory=16 * 2**20)))
    tok = eng.tokenizer
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
                      add_special_tokens=False), tok.encode("The three primary colors are")]
    want = eng.generate(ids, SamplingParams(max_tokens=16, temperature=0))
    client = WorkerClient()
    for i, x in enumerate(ids):
        client.submit(p.info, f"s{i}", x, SamplingSpec(max_tokens=16, temperature=0.0), decode=d.info)
    client.collect(timeout=180)
    for i in range(len(ids)):
        assert client.streams[f"s{i}"].token_ids == want[i]["outputs"][0]["token_ids"], client.streams[f"s{i}"].error
    for w in (d, p):
        st = w.stop()
        assert st["free_blocks"] == st["num_blocks"]


def test_seeded_sampling_is_the_same_disaggregated(cluster, tiny_llama):
    d = cluster("decode")
    p = cluster("prefill")
    ps = prompts(3, seed=7)
    params = {"max_tokens": 16, "temperature": 0.9, "top_p": 0.95, "seed": 11, "ignore_eos": True}
    client = run_all(p, ps, SamplingSpec(**params), d)
    eng = LLMEngine(EngineConfig(str(tiny_llama), cache=CacheConfig(block_size=4, kv_cache_memory=2 * 2**20)))
    want = [r["outputs"][0]["token_ids"] for r in eng.generate(ps, SamplingParams(**params))]
    assert [client.streams[f"r{i}"].token_ids for i in range(3)] == want


def test_a_speculating_decode_worker_changes_no_token(cluster, tiny_llama):
    """--speculative ngram on the decode worker: its proposer starts from the handed-off tokens; greedy
    and seeded output equal one process without speculation, and the worker counts what it guessed."""
    d = cluster("decode", "--speculative", "ngram", "--num-speculative-tokens", "4", "--speculative-max-batch", "64")
    p = cluster("prefill")
    ps = [[7, 8] * 10 + [9], [40, 41, 42, 43, 44] * 6, *prompts(2, seed=5)]
    greedy = {"max_tokens": 24, **GREEDY}
    seeded = {"max_tokens": 24, "temperature": 0.8, "seed": 3, "ignore_eos": True}
    client = run_all(p, ps, SamplingSpec(**greedy), d, tag="g")
    run_all(p, ps, SamplingSpec(**seeded), d, tag="s", client=client)
    eng = LLMEngine(EngineConfig(str(tiny_llama), cache=CacheConfig(block_size=4, kv_cache_memory=2 * 2**20)))
    for tag, params in (("g", greedy), ("s", seeded)):
        want = [r["outputs"][0]["token_ids"] for r in eng.generate(ps, SamplingParams(**params))]
        assert [client.streams[f"{tag}{i}"].token_ids for i in range(len(ps))] == want, tag
    ds = d.stop()
    assert ds["spec_accepted_tokens_total"] > 0 and ds["spec_proposed_tokens_total"] > 0, ds
    assert ds["free_blocks"] == ds["num_blocks"]


def mixed_reference(model_dir, ps, max_tokens, prefill_dtype, decode_dtype):
    """What a `prefill_dtype` prefill worker and a `decode_dtype` decode worker compute, in one process: each
    prompt's KV and first token from an engine in the one dtype, the KV cast into the other engine's cache
    (as the decode worker's receiver casts it), the rest decoded there, all prompts in one batch."""
    import torch

    from kvtransfer.reservations import BlockPoolReserver

    def engine(dtype):
        return LLMEngine(EngineConfig(str(model_dir), cache=CacheConfig(block_size=4, kv_cache_memory=2 * 2**20),
                                      device=DeviceConfig(dtype=dtype)))
    pre, dec = engine(prefill_dtype), engine(decode_dtype)
    pool = BlockPoolReserver(dec.block_manager)
    params = SamplingParams(max_tokens=max_tokens, **GREEDY)
    out = {}
    for i, p in enumerate(ps):
        pre.add_request(f"r{i}", p, params)
        step = pre.scheduler.schedule()  # the prompt's one prefill step, as in tests/kv_peers.py
        seq = step.scheduled[0].seq
        pre.scheduler.update(step, pre.runner.execute(step).sampled)
        blocks, _ = pool.reserve(f"r{i}", len(p))
        src, dst = torch.tensor(seq.block_ids[:len(blocks)]), torch.tensor(blocks)
        for a, b in zip(pre.runner.kv_caches, dec.runner.kv_caches):
            b.index_copy_(1, dst, a.index_select(1, src).to(b.dtype))
        out[f"r{i}"] = [seq.token_ids[len(p)]]
        pre.abort_request(f"r{i}")
        dec.add_prefilled(f"r{i}", p, out[f"r{i}"][0], params, pool.take(f"r{i}").block_ids)
    while dec.has_unfinished_requests():
        for r in dec.step():
            out[r.request_id] += r.outputs[0].token_ids
    pre.shutdown()
    dec.shutdown()
    return [out[f"r{i}"] for i in range(len(ps))]


def test_a_bf16_prefill_worker_ships_to_an_fp32_decode_worker(cluster, tiny_llama):
    """Hosts that resolve `--dtype auto` differently (bf16 with AMX, fp32 on AVX2) pair up: the pages
    leave in bf16 and the decode worker casts them into its fp32 cache (the cast itself, bit for bit:
    tests/unit/test_kv_dtypes.py). The first token is the bf16 prefill's, the rest fp32 decode steps over
    bf16-rounded prompt KV, which need not equal either one-process run (on an AVX2 CPU, one prompt here
    leaves both at a near tie), so the reference is that mixed computation in one process."""
    d = cluster("decode", "--dtype", "float32", wait=False)
    p = cluster("prefill", "--dtype", "bfloat16", wait=False)
    ps = prompts(3, seed=12)
    want = mixed_reference(tiny_llama, ps, 12, "bfloat16", "float32")
    assert (p.info["layout"]["dtype"], d.info["layout"]["dtype"]) == ("bfloat16", "float32")
    client = run_all(p, ps, SamplingSpec(max_tokens=12, **GREEDY), d)
    for i in range(len(ps)):
        s = client.streams[f"r{i}"]
        assert s.error == "" and s.token_ids == want[i] and set(s.workers[1:]) == {"decode-0"}, (i, s.error)
    ds, pst = d.stop(), p.stop()
    assert ds["free_blocks"] == ds["num_blocks"] and pst["free_blocks"] == pst["num_blocks"]


@pytest.mark.parametrize("p_shape,d_shape,d_transport", [((1, 1), (2, 1), "gloo"), ((2, 1), (1, 2), "gloo"),
                                                         ((1, 1), (1, 1), "zmq")])
def test_kv_over_torch_distributed_pair_groups(cluster, tiny_llama, p_shape, d_shape, d_transport):
    """`--kv-transport gloo`: KV payloads take torch.distributed pair groups (the NCCL code path, with
    gloo on CPU) between every sending and receiving rank; control stays on ZeroMQ. A decode worker
    on ZeroMQ frames gets frames from a gloo prefill worker (it answers the pairing with 'frames')."""
    d = cluster("decode", "--tp", str(d_shape[0]), "--pp", str(d_shape[1]), "--kv-transport", d_transport)
    p = cluster("prefill", "--tp", str(p_shape[0]), "--pp", str(p_shape[1]), "--kv-transport", "gloo")
    ps = prompts(4, seed=7)
    t0 = time.monotonic()
    client = run_all(p, ps, SamplingSpec(max_tokens=10, **GREEDY), d, timeout=120)
    want = reference(tiny_llama, ps, 10)
    for i in range(len(ps)):
        s = client.streams[f"r{i}"]
        assert s.error == "" and s.token_ids == want[i], (i, s.error, d.stderr(), p.stderr())
    assert time.monotonic() - t0 < 25  # no pairing timeout on the way (it is 30 s)
    ds, pst = d.stop(), p.stop()
    assert ds["free_blocks"] == ds["num_blocks"] and pst["free_blocks"] == pst["num_blocks"]
    via_dist = ds["metrics"].get("frames_via_dist", 0)
    if d_transport == "gloo":
        assert via_dist > 0 and ds["metrics"].get("dist_recv_failed", 0) == 0
    else:
        assert via_dist == 0 and ds["metrics"]["frames_ok"] > 0


def test_nccl_transport_without_cuda_is_a_clear_error(tiny_llama):
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "worker", "--role", "decode", "--model", str(tiny_llama),
                        "--kv-transport", "nccl"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nccl needs a CUDA device" in r.stderr


def test_stop_strings_that_start_in_the_first_token_match_one_process(cluster, tiny_llama):
    """P samples the first token and D the rest: a stop string that starts in the first token's text
    must not leak its start to the client (P holds that text back and hands it to D)."""
    eng = LLMEngine(EngineConfig(str(tiny_llama), cache=CacheConfig(block_size=4, kv_cache_memory=2 * 2**20)))
    d = cluster("decode")
    p = cluster("prefill")
    client = WorkerClient()
    cases, n = [], 0
    for prompt in prompts(12, seed=9):
        text = eng.generate([prompt], SamplingParams(max_tokens=12, **GREEDY))[0]["outputs"][0]["text"]
        for stop in {text[0:2], text[0:3], text[1:4]}:
            if len(stop) < 2 or "\ufffd" in stop:
                continue
            params = {"max_tokens": 12, "stop": [stop], **GREEDY}
            want = eng.generate([prompt], SamplingParams(**params))[0]["outputs"][0]
            client.submit(p.info, f"r{n}", prompt, SamplingSpec(**params), decode=d.info)
            cases.append((f"r{n}", want))
            n += 1
    assert len(cases) >= 6
    client.collect(timeout=120)
    for rid, want in cases:
        s = client.streams[rid]
        assert s.error == "" and (s.text, s.finish_reason) == (want["text"], want["finish_reason"]), rid
    assert sum(w["finish_reason"] == "stop" for _, w in cases) >= 3


def test_an_unreadable_request_is_answered_at_once_not_left_to_time_out(cluster, tiny_llama):
    """A request the worker cannot decode (another protocol version, a wrong field type) but that says
    who waits for it gets an error chunk at once ("unavailable", blamed on this worker, so a gateway
    places it elsewhere); the worker goes on serving."""
    import msgspec

    from common.messages import VERSION, PrefillRequest, encode
    from common.worker_client import Stream
    p = cluster("colocated")
    client = WorkerClient()
    sock = client._sock(p.info["endpoint"])
    client.streams["v2"] = Stream()
    sock.send(encode(PrefillRequest(VERSION + 1, "v2", 0, [5, 6, 7], SamplingSpec(max_tokens=2),
                                    client.reply_to)))
    client.streams["typo"] = Stream()
    bad = msgspec.msgpack.decode(encode(PrefillRequest(VERSION, "typo", 3, [5, 6, 7], SamplingSpec(), client.reply_to)))
    bad["prompt_token_ids"] = "not a list"
    sock.send(msgspec.msgpack.encode(bad))
    t0 = time.monotonic()
    client.collect(timeout=10)
    assert time.monotonic() - t0 < 5
    for rid in ("v2", "typo"):
        s = client.streams[rid]
        assert s.finish_reason == "error" and "cannot read the request" in s.error, (rid, s)
    client.submit(p.info, "ok", prompts(1, seed=3)[0], SamplingSpec(max_tokens=4, **GREEDY))
    client.collect(timeout=30)
    assert client.streams["ok"].finish_reason == "length"
    assert p.stop()["metrics"]["messages_bad"] == 2


@pytest.mark.parametrize("reuse", [True, False])
def test_a_second_turn_ships_only_what_the_decode_worker_lacks_and_changes_no_token(cluster, tiny_llama, reuse):
    """Decode-side reuse across turns: turn 2 (turn 1's prompt + its answer + a new message) goes to
    the decode worker that decoded turn 1; it links the leading blocks its prefix cache still holds and
    receives only the rest. Greedy tokens equal the single-process engine's, reuse on or off."""
    d = cluster("decode", *([] if reuse else ["--no-prefix-caching"]))
    p = cluster("prefill")
    client = WorkerClient()
    turn1 = prompts(1, seed=7)[0] + list(range(30, 60))  # at least 30 tokens: several full blocks of 4
    client.submit(p.info, "t1", turn1, SamplingSpec(max_tokens=8, **GREEDY), decode=d.info)
    client.collect(timeout=60)
    answer = client.streams["t1"].token_ids
    turn2 = turn1 + answer + [17, 18, 19, 20, 21]
    client.submit(p.info, "t2", turn2, SamplingSpec(max_tokens=8, **GREEDY), decode=d.info)
    client.collect(timeout=60)
    assert [answer, client.streams["t2"].token_ids] == reference(tiny_llama, [turn1, turn2], 8)
    m = d.stop()["metrics"]
    blocks1, blocks2 = -(-len(turn1) // 4), -(-len(turn2) // 4)
    if reuse:  # every full block of turn 1's prompt + answer that was computed there is linked, not sent
        assert m["blocks_held"] >= len(turn1) // 4, m
        assert m["blocks_received"] == blocks1 + blocks2 - m["blocks_held"], m
    else:
        assert m.get("blocks_held", 0) == 0 and m["blocks_received"] == blocks1 + blocks2, m
    p.stop()
