import itertools

import msgspec
import pytest

from kvtransfer.plan import IncompatibleLayouts, KVLayout, plan_transfer


def layout(tp, pp, layers=4, kv_heads=2, **kw):
    return KVLayout(num_layers=layers, num_kv_heads=kv_heads, head_dim=8, block_size=4, dtype="float32",
                    tp=tp, pp=pp, **kw)


SHAPES = list(itertools.product([1, 2], [1, 2]))


def coverage_ok(src, dst, items):
    """Every destination rank gets each (layer, head) it holds exactly once, from a rank that has it."""
    for d in range(dst.num_ranks):
        d_tp, d_pp = dst.coords(d)
        need = {(layer, h) for layer in range(*dst.layers(d_pp)) for h in range(*dst.heads(d_tp))}
        got = []
        for it in items:
            if it.dst_rank != d:
                continue
            s_tp, s_pp = src.coords(it.src_rank)
            sl, sh = src.layers(s_pp), src.heads(s_tp)
            assert sl[0] <= it.layers[0] and it.layers[1] <= sl[1], it
            assert sh[0] <= it.heads[0] and it.heads[1] <= sh[1], it
            got += [(layer, h) for layer in range(*it.layers) for h in range(*it.heads)]
        assert sorted(got) == sorted(need), (d, sorted(got), sorted(need))


@pytest.mark.parametrize("src_shape,dst_shape", list(itertools.product(SHAPES, SHAPES)))
def test_every_tp_pp_combination_covers_each_destination_exactly_once(src_shape, dst_shape):
    src, dst = layout(*src_shape), layout(*dst_shape)
    coverage_ok(src, dst, plan_transfer(src, dst))


@pytest.mark.parametrize("src_tp,dst_tp", [(1, 3), (3, 1), (3, 3), (6, 1), (1, 6), (6, 3), (2, 4), (4, 2)])
def test_replicated_kv_heads_and_odd_layer_splits(src_tp, dst_tp):
    kv = 3 if 3 in (src_tp, dst_tp) or 6 in (src_tp, dst_tp) else 2
    src = layout(src_tp, 2, layers=5, kv_heads=kv)
    dst = layout(dst_tp, 3, layers=5, kv_heads=kv)
    items = plan_transfer(src, dst)
    coverage_ok(src, dst, items)
    if src_tp > kv:  # each head has replicas; the destinations spread over them, not all on the first
        assert len({it.src_rank for it in items}) > src.pp * kv


def test_the_documented_example():
    items = plan_transfer(layout(2, 1), layout(1, 2))
    assert [(i.src_rank, i.dst_rank, i.layers, i.heads) for i in items] == [
        (0, 0, (0, 2), (0, 1)), (1, 0, (0, 2), (1, 2)), (0, 1, (2, 4), (0, 1)), (1, 1, (2, 4), (1, 2))]


# (dtypes: float ones convert into each other, tests/unit/test_kv_dtypes.py)
@pytest.mark.parametrize("field,value", [("block_size", 8), ("head_dim", 16), ("num_layers", 6), ("num_kv_heads", 4)])
def test_incompatible_layouts_are_refused_with_the_field(field, value):
    a = layout(1, 1)
    b = msgspec.structs.replace(a, **{field: value})
    with pytest.raises(IncompatibleLayouts, match=field):
        plan_transfer(a, b)


def test_impossible_tp_is_refused():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        layout(4, 1, kv_heads=3)


@pytest.mark.parametrize("src,dst", [("int8", "auto"), ("auto", "fp8_e4m3"), ("int8", "fp8_e4m3")])
def test_a_quantized_kv_cache_pairs_only_with_the_same_kv_cache_dtype(src, dst):
    """--kv-cache-dtype: a quantized page (codes and scales) is refused by any other cache, with both sides named."""
    a, b = (msgspec.structs.replace(layout(1, 1), kv_cache_dtype=kv) for kv in (src, dst))
    stored = {"auto": "float32", "int8": "int8", "fp8_e4m3": "fp8_e4m3"}
    with pytest.raises(IncompatibleLayouts, match=f"KV cache dtypes differ: prefill stores '{stored[src]}' .*"
                                                  f"decode stores '{stored[dst]}'"):
        plan_transfer(a, b)
    same = msgspec.structs.replace(layout(2, 1), kv_cache_dtype=src if src != "auto" else dst)
    assert plan_transfer(same, msgspec.structs.replace(layout(1, 2), kv_cache_dtype=same.kv_cache_dtype))
    with pytest.raises(ValueError, match="kv_cache_dtype = 'int4'"):
        msgspec.structs.replace(a, kv_cache_dtype="int4")


def test_quantized_pages_are_checked_in_one_byte_elements():
    from kvtransfer.protocol import VERSION, MessageError, Pages, decode, encode

    row = 16 + 4  # head_dim codes and the fp32 scale
    ok = Pages(VERSION, "r", 0, 0, 0, (0, 2), [3, 4], "int8", [2, 2, 2, 4, row], 2 * 2 * 2 * 4 * row)
    assert decode(encode(ok)) == ok
    with pytest.raises(MessageError, match="header says"):
        decode(encode(msgspec.structs.replace(ok, nbytes=4 * ok.nbytes)))
    with pytest.raises(MessageError, match="unknown dtype 'int4'"):
        decode(encode(msgspec.structs.replace(ok, dtype="int4")))
    lay = msgspec.structs.replace(layout(1, 1), kv_cache_dtype="fp8_e4m3")
    assert (lay.page_dtype, lay.row_width) == ("fp8_e4m3", lay.head_dim + 4)


def test_kv_of_another_model_is_refused():
    """Layouts alike but for the models' digests (ModelConfig.identity: a LongRoPE model served with another
    --max-model-len counts as another model); an older worker's empty digest is not held against it."""
    from kvtransfer.plan import IncompatibleLayouts, KVLayout, check_compatible

    a = KVLayout(4, 2, 16, 4, "float32", model_id="0123456789abcdef")
    b = KVLayout(4, 2, 16, 4, "float32", model_id="fedcba9876543210")
    with pytest.raises(IncompatibleLayouts, match="KV of different models: prefill serves model 0123456789abcdef"):
        check_compatible(a, b)
    check_compatible(a, KVLayout(4, 2, 16, 4, "float32", model_id="0123456789abcdef"))
    check_compatible(a, KVLayout(4, 2, 16, 4, "float32"))


def test_a_longrope_model_served_with_another_context_limit_is_another_model(tmp_path):
    """Phi-3's factor set follows --max-model-len (engine/config.py with_context_limit): two workers that
    chose differently compute different KV, and their layouts say so."""
    from helpers import make_tiny_model

    from engine.config import ModelConfig
    from kvtransfer.plan import model_digest

    cfg = ModelConfig.from_dir(make_tiny_model(tmp_path / "phi3", "phi3"))
    short, long_ = cfg.with_context_limit(32), cfg.with_context_limit(None)
    assert short.rope_scaling.use_long_factor != long_.rope_scaling.use_long_factor
    assert model_digest(short) != model_digest(long_)
    assert model_digest(short) == model_digest(cfg.with_context_limit(16))
