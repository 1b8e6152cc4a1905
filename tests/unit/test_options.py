"""Engine options are written once (engine/config.py's `option(...)` fields): every one is a flag of
`cluster worker`, and values round-trip through it to the EngineConfig."""

import dataclasses
import typing

import pytest

from cluster.cli import build_parser
from cluster.options import engine_config, engine_options, given
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
    return "cuda:1", "cuda:1"


def test_every_field_is_an_option_or_named_here_with_a_reason():
    options = {o.path for o in engine_options()}
    assert set(leaf_fields(EngineConfig)) == options | set(NOT_OPTIONS)
    assert not options & set(NOT_OPTIONS)


def test_every_option_is_a_flag_of_worker_and_generate_but_worker_only_ones():
    worker, generate = worker_parser()
    worker_flags = {s for a in worker._actions for s in a.option_strings}
    generate_flags = {s for a in generate._actions for s in a.option_strings}
    for o in engine_options():
        assert o.flag in worker_flags, o
        assert (o.flag in generate_flags) == (o.path[0] not in ("parallel", "kv_transfer")), o
    assert len({o.name for o in engine_options()}) == len(engine_options())


def test_the_flags_users_know_keep_their_names():
    flags = {o.flag for o in engine_options()}
    assert {"--dtype", "--device", "--threads", "--no-packed-linear", "--kv-cache-memory", "--block-size",
            "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--no-prefix-caching", "--quantization",
            "--tp", "--pp", "--kv-transport"} == flags


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
