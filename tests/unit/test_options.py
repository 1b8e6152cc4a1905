"""Engine options are written once (engine/config.py's `option(...)` fields): every one is a flag of
`cluster worker` and a key of the cluster file, and values round-trip through both to the EngineConfig."""

import dataclasses
import typing

import pytest

from cluster.cli import build_parser
from cluster.config import MODEL_WIDE, Model, Pool, loads
from cluster.launcher import spec_from_args
from cluster.options import engine_config, engine_options, given, to_argv
from engine.config import EngineConfig

# Fields of EngineConfig that are not options, and why; a new field must be one or the other.
NOT_OPTIONS = {
    ("model",): "--model and [model] path: a directory or the built-in default, resolved before the config",
    ("kv_transfer", "host"): "the worker's --host, and the address of its host in the cluster file",
    ("cache", "kv_cache_memory_fraction"): "tuning, set in code",
    ("cache", "cpu_kv_cache_default"): "tuning, set in code",
    ("cache", "num_blocks"): "tests and profiling",
    ("device", "seed"): "set in code",
    ("device", "tune_malloc"): "tuning, set in code",
    ("parallel", "timeout_s"): "tuning, set in code",
    ("parallel", "micro_batches"): "tuning, set in code",
    ("parallel", "pipeline_steps"): "tuning, set in code",
    ("parallel", "pipeline_min_seqs"): "tuning, set in code",
    ("kv_transfer", "timeout_s"): "tuning, set in code",
    ("speculative", "ngram_min"): "tuning, set in code",
    ("speculative", "ngram_max"): "tuning, set in code",
}


def leaf_fields(cls, prefix=()):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_fields(hints[f.name], (*prefix, f.name))
        else:
            yield (*prefix, f.name)


def worker_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    return sub.choices["worker"], sub.choices["generate"]


def other_value(o):
    """A value the user could write that is not the default, and what the field then holds."""
    if o.parse:
        return "512MiB", 512 * 2**20
    if o.switch:
        return not o.default, not o.default
    if typing.get_origin(o.type) is typing.Literal:
        v = next(c for c in typing.get_args(o.type) if c != o.default)
        return v, v
    if o.type is int:
        return 2 * (o.default or 1), 2 * (o.default or 1)
    assert o.type is str, o
    if o.name == "speculative":
        return "draft:/models/d", "draft:/models/d"
    return "cuda:1", "cuda:1"


def test_every_field_is_an_option_or_named_here_with_a_reason():
    options = {o.path for o in engine_options()}
    assert set(leaf_fields(EngineConfig)) == options | set(NOT_OPTIONS)
    assert not options & set(NOT_OPTIONS)


def test_every_option_has_a_flag_and_a_cluster_file_key():
    worker, generate = worker_parser()
    worker_flags = {s for a in worker._actions for s in a.option_strings}
    generate_flags = {s for a in generate._actions for s in a.option_strings}
    file_keys = set(Pool.__struct_fields__) | set(Model.__struct_fields__)
    for o in engine_options():
        assert o.flag in worker_flags, o
        assert (o.flag in generate_flags) == (o.path[0] not in ("parallel", "kv_transfer")), o
        assert o.name in file_keys, o
        assert o.name in (Model if o.name in MODEL_WIDE else Pool).__struct_fields__, o
    assert len({o.name for o in engine_options()}) == len(engine_options())


def test_the_flags_users_know_keep_their_names():
    flags = {o.flag for o in engine_options()}
    assert {"--dtype", "--device", "--threads", "--no-packed-linear", "--kv-cache-memory", "--block-size",
            "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--no-prefix-caching", "--quantization",
            "--tp", "--pp", "--kv-transport", "--int8-activations", "--kv-cache-dtype", "--speculative",
            "--num-speculative-tokens", "--speculative-max-batch", "--draft-quantization"} == flags
    assert {"tp", "pp", "device", "threads", "block_size", "kv_cache_memory", "kv_transport"} <= \
        set(Pool.__struct_fields__)


@pytest.mark.parametrize("o", engine_options(), ids=lambda o: o.name)
def test_a_flag_round_trips_to_the_config(o):
    worker, _ = worker_parser()
    text, held = other_value(o)
    argv = ["--role", "prefill"] + ([o.flag] if o.switch else [o.flag, str(text)])
    config = engine_config("m", given(worker.parse_args(argv)))
    value = config
    for part in o.path:
        value = getattr(value, part)
    assert value == held
    assert engine_config("m", given(worker.parse_args(["--role", "prefill"]))) == EngineConfig("m")


def test_a_pool_in_the_file_reaches_its_workers_as_flags():
    """The launcher's conversion: a pool's keys -> worker flags -> the EngineConfig the keys describe."""
    worker, _ = worker_parser()
    keys = {o.name: other_value(o)[0] for o in engine_options()}
    pool = "\n".join(f"{k} = {v!r}".replace("True", "true").replace("False", "false")
                     for k, v in keys.items() if k not in MODEL_WIDE)
    model = "\n".join(f"{k} = {keys[k]!r}" for k in MODEL_WIDE)
    spec = loads(f'[model]\n{model}\n[[pool]]\nrole = "colocated"\n{pool}\n')
    values = spec.engine_values(spec.pool[0])
    assert values == keys
    argv = to_argv(values)
    from_flags = engine_config("m", given(worker.parse_args(["--role", "colocated", *argv])))
    assert from_flags == engine_config("m", keys) != EngineConfig("m")
    assert to_argv(loads("").engine_values(loads("").pool[0])).count("--no-packed-linear") == 0


def test_up_flags_set_keys_over_the_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('name = "demo"\n[gateway]\nport = 9000\n[[pool]]\nrole = "prefill"\nthreads = 4\n'
                 '[[pool]]\nrole = "decode"\n')
    up = ["up", "-f", str(f)]
    spec = spec_from_args(build_parser().parse_args(up))
    assert (spec.name, spec.gateway.port, [p.threads for p in spec.pool]) == ("demo", 9000, [4, 1])
    args = build_parser().parse_args([*up, "--cluster", "other", "--port", "0", "--etcd", "http://a:1,http://b:2",
                                      "--gateway-host", "0.0.0.0", "--admin-port", "9001", "--policy", "round-robin",
                                      "--api-key", "k1", "--api-key", "k2", "--threads", "2",
                                      "--kv-cache-memory", "1GiB", "--decode", "3"])
    spec = spec_from_args(args)
    assert spec.name == "other" and spec.gateway.port == 0 and spec.gateway.host == "0.0.0.0"
    assert spec.etcd.endpoints == ["http://a:1", "http://b:2"] and spec.coordinator.admin_port == 9001
    assert spec.placement.policy == "round-robin" and spec.gateway.api_keys == ["k1", "k2"]
    assert [(p.threads, p.kv_cache_memory, p.replicas) for p in spec.pool] == [(2, "1GiB", 1), (2, "1GiB", 3)]


def test_up_pool_flags_reach_the_pools_other_flags_add(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[[pool]]\nrole = "colocated"\n')
    spec = spec_from_args(build_parser().parse_args(["up", "-f", str(f), "--prefill", "1", "--decode", "2",
                                                     "--threads", "3"]))
    assert [(p.role, p.replicas, p.threads) for p in spec.pool] == [("colocated", 1, 3), ("prefill", 1, 3),
                                                                   ("decode", 2, 3)]
