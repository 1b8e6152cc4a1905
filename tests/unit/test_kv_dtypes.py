"""`--dtype auto` and KV of different float dtypes: the rule that resolves `auto` on a host (CPU flags,
CUDA capability; both faked, no weights), the plan's compatibility rule, and pages of one float dtype
written into a cache of another, bit for bit what a cast gives, on every receiving path (ZeroMQ frames
through a real socket, a torch.distributed tensor, a staging buffer)."""

import time

import pytest
import torch
import zmq

from engine import platform
from engine.config import DeviceConfig, EngineConfig
from kvtransfer.frames import Staged
from kvtransfer.pages import RankCaches
from kvtransfer.plan import IncompatibleLayouts, KVLayout, plan_transfer
from kvtransfer.protocol import VERSION, Pages, encode
from kvtransfer.receiver import Landed, RankReceiver
from kvtransfer.zmq_transport import KVServer

AVX2 = "flags : fpu sse2 avx avx2 fma f16c"
AVX512 = AVX2 + " avx512f avx512bw avx512vl avx512dq"


@pytest.mark.parametrize("flags,want", [(AVX2, "float32"), (AVX512, "float32"),
                                        (AVX512 + " avx512_bf16", "bfloat16"),
                                        (AVX512 + " amx_tile amx_bf16 amx_int8", "bfloat16"),
                                        ("Features : fp asimd", "float32")])
def test_auto_on_a_cpu_is_bf16_only_where_it_computes_bf16_natively(monkeypatch, flags, want):
    monkeypatch.setattr(platform, "cpu_flags", lambda: flags)
    assert platform.resolve_dtype("auto", "cpu") == want
    assert platform.resolve_device(DeviceConfig()).dtype == want
    for dtype in ("float32", "bfloat16", "float16"):  # a dtype asked for is kept on any host
        assert platform.resolve_dtype(dtype, "cpu") == dtype


@pytest.mark.parametrize("capability,hip,want", [((8, 0), False, "bfloat16"), ((9, 0), False, "bfloat16"),
                                                 ((7, 5), False, "float16"), ((7, 0), True, "bfloat16")])
def test_auto_on_cuda_is_bf16_from_ampere_on_else_fp16(monkeypatch, capability, hip, want):
    monkeypatch.setattr(platform, "cpu_flags", lambda: AVX2)  # (the CPU does not count)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", "6.0" if hip else None)
    assert platform.resolve_dtype("auto", "cuda") == want
    assert platform.resolve_device(DeviceConfig(device="cuda:1")) == DeviceConfig(device="cuda:1", dtype=want)


def test_auto_on_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda:0': CUDA is not available"):
        platform.resolve_dtype("auto", "cuda:0")


def test_auto_is_the_default_and_a_resolved_config_is_unchanged_otherwise(monkeypatch):
    monkeypatch.setattr(platform, "cpu_flags", lambda: AVX2)
    assert DeviceConfig().dtype == EngineConfig("m").device.dtype == "auto"
    fixed = DeviceConfig(dtype="bfloat16", num_threads=2)
    assert platform.resolve_device(fixed) is fixed
    assert platform.resolve_device(DeviceConfig(num_threads=2)) == DeviceConfig(dtype="float32", num_threads=2)
    with pytest.raises(ValueError, match="dtype = 'fp8'"):
        DeviceConfig(dtype="fp8")


def layout(dtype, tp=1, **kw):
    return KVLayout(**{"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "block_size": 2, "dtype": dtype,
                       "tp": tp, **kw})


@pytest.mark.parametrize("src,dst", [("bfloat16", "float32"), ("float32", "bfloat16"), ("float16", "bfloat16"),
                                     ("float32", "float16")])
def test_float_kv_dtypes_plan_like_equal_ones(src, dst):
    assert plan_transfer(layout(src, tp=2), layout(dst)) == plan_transfer(layout(dst, tp=2), layout(dst))


@pytest.mark.parametrize("src,dst,field", [("int8", "float32", "dtype"), ("float32", "int8", "dtype"),
                                           ("bfloat16", "float32", "block_size")])
def test_other_mismatches_are_still_refused_with_the_field(src, dst, field):
    bad = {"block_size": 4} if field == "block_size" else {}
    with pytest.raises(IncompatibleLayouts, match=f"differ in {field}"):
        plan_transfer(layout(src), layout(dst, **bad))


DST = layout("float32")
K = [torch.randn(2, 2, 2, 4) for _ in range(2)]  # a layer's 2 blocks: [blocks, heads, block_size, head_dim]
V = [torch.randn(2, 2, 2, 4) for _ in range(2)]


def _pages(rid, layer, dtype, heads=(0, 2), src_rank=0, runs=(2,), nbytes_dtype=None):
    """The header of one layer's pages of blocks 2 and 3 (ZeroMQ runs: K then V of both blocks)."""
    nh = heads[1] - heads[0]
    nbytes = 2 * 2 * nh * 2 * 4 * (4 if (nbytes_dtype or dtype) == "float32" else 2)
    return Pages(VERSION, rid, 0, src_rank, layer, heads, [2, 3], dtype, [2, 2, nh, 2, 4], nbytes, runs=list(runs))


def _receiver(cache_dtype, done, **kw):
    caches = RankCaches([torch.zeros(2, 8, 2, 2, 4, dtype=cache_dtype) for _ in range(2)], 0, 0)
    return RankReceiver(0, layout(str(cache_dtype).removeprefix("torch.")), caches, lambda *a: done.append(a),
                        **kw), caches


def _check(caches, sent_dtype, heads=(0, 2)):
    h0, h1 = heads
    for layer in (0, 1):
        cache = caches.caches[layer]
        for kv, src in ((0, K), (1, V)):
            want = src[layer][:, h0:h1].to(sent_dtype).to(cache.dtype)  # what the sender held, cast once
            assert torch.equal(cache[kv, 2:4, h0:h1], want), (layer, kv)


@pytest.mark.parametrize("sent,cache", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                        (torch.float16, torch.float32)])
def test_frames_of_another_float_dtype_are_cast_into_the_cache_over_zeromq(sent, cache):
    done = []
    recv, caches = _receiver(cache, done)
    srv = KVServer("tcp://127.0.0.1:0", recv, None)
    srv.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(srv.endpoint)
    try:
        src_dtype = str(sent).removeprefix("torch.")
        recv.expect("r", 0, [2, 3], layout(src_dtype), time.monotonic() + 10)
        for layer in (0, 1):
            frames = [t[layer].to(sent).contiguous().view(torch.uint8).numpy().tobytes() for t in (K, V)]
            sock.send_multipart([encode(_pages("r", layer, src_dtype)), *frames])
        deadline = time.monotonic() + 5
        while not done and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sock.close(0)
        srv.stop()
    assert done == [("r", 0, 0, True, "")]
    assert recv.metrics["frames_in_place"] == 0 and recv.metrics["frames_ok"] == 2  # they cannot land as they come
    _check(caches, sent)


@pytest.mark.parametrize("staged", [False, True])
def test_a_tensor_or_staged_payload_of_another_dtype_is_cast_too_partial_heads_included(staged):
    """A torch.distributed payload is one tensor of the sender's dtype; a staging buffer (a GPU cache's
    path, `stage_frames`) holds the sender's bytes. Heads (1, 2): a TP rank's share of the pages."""
    done = []
    recv, caches = _receiver(torch.float32, done, stage_frames=staged)
    recv.expect("r", 0, [2, 3], KVLayout(2, 2, 4, 2, "bfloat16", tp=2), time.monotonic() + 10)
    for src_rank, heads in ((0, (0, 1)), (1, (1, 2))):
        for layer in (0, 1):
            pages = torch.stack([t[layer][:, heads[0]:heads[1]] for t in (K, V)]).to(torch.bfloat16)
            msg = _pages("r", layer, "bfloat16", heads, src_rank, runs=())
            if staged:
                place = recv.landing(msg)
                assert isinstance(place, Staged)
                place.frames()[0].copy_(pages.contiguous().view(torch.uint8).view(-1))
                recv.on_pages(msg, Landed([msg.nbytes], False, place))
            else:
                recv.on_pages(msg, pages)
    assert done == [("r", 0, 0, True, "")]
    _check(caches, torch.bfloat16)


def test_a_frame_in_a_dtype_that_does_not_convert_fails_its_transfer():
    done = []
    recv, caches = _receiver(torch.float32, done)
    recv.expect("r", 0, [2, 3], DST, time.monotonic() + 10)
    # (decoding refuses a dtype it does not know first; this is the receiver's own check, beneath that)
    msg = _pages("r", 0, "int8", nbytes_dtype="float16")
    recv.on_pages(msg, [b"\0" * (msg.nbytes // 2)] * 2)
    assert done and done[0][3] is False and "does not match this cache (float32)" in done[0][4]
