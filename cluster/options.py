"""Engine options, written once: the fields of engine/config.py's structs declared with `option(...)`.

From each this module makes a flag of `cluster generate` and `cluster worker` (`--block-size 32`), and
cluster/config.py a key of the cluster file (`block_size = 32` in a [[pool]], or in [model] for the few
that must be one per cluster). Parsed flags or a pool's keys turn back into an EngineConfig
(`engine_config`), and a pool's keys into a worker's command line (`to_argv`), by walking the same list:

    EngineConfig field ──option()──▶ Option(path, name, type, default) ──▶ --flag / file key
                        ◀──engine_config()── {name: value} ◀── parsed flags / a pool's keys

The name is the field's unless its metadata names another (`DeviceConfig.num_threads` is `--threads`
and `threads`); a switch that is on by default is turned off with `--no-NAME`. Torch-free.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from engine.config import EngineConfig

# the sections of EngineConfig that only a worker sets (its ranks, how its KV moves): not `cluster generate`
WORKER_ONLY = ("parallel", "kv_transfer")


@dataclasses.dataclass(frozen=True)
class Option:
    path: tuple[str, ...]  # where the value lives in EngineConfig: ("device", "num_threads")
    name: str  # the cluster-file key and the flag's dest; the flag is its kebab case
    type: Any  # what a user writes: int, float, str, bool or a Literal of the choices
    default: Any
    help: str
    parse: Callable[[Any], Any] | None = None  # what a user writes -> the field's value

    @property
    def switch(self) -> bool:
        return self.type is bool

    @property
    def flag(self) -> str:
        kebab = self.name.replace("_", "-")
        return f"--no-{kebab}" if self.switch and self.default else f"--{kebab}"

    @property
    def file_type(self) -> Any:
        """The type of its cluster-file key (absent or null: the default)."""
        return self.type | None if self.default is None else self.type


@functools.cache
def engine_options(worker: bool = True) -> tuple[Option, ...]:
    """Every option of EngineConfig, in field order; without `worker`, those of `cluster generate`."""
    return tuple(o for o in _walk(EngineConfig, ()) if worker or o.path[0] not in WORKER_ONLY)


def _walk(cls, prefix: tuple[str, ...]) -> Iterable[Option]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _walk(hint, (*prefix, f.name))
        elif "help" in f.metadata:
            m = f.metadata
            typ = str if m["parse"] else Literal[m["choices"]] if m["choices"] else _without_none(hint)
            yield Option((*prefix, f.name), m["name"] or f.name, typ, f.default, m["help"], m["parse"])


def _without_none(hint):
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
    return hint


def by_name(*names: str) -> tuple[Option, ...]:
    known = {o.name: o for o in engine_options()}
    return tuple(known[n] for n in names)


def add_flags(parser: argparse.ArgumentParser, options: Iterable[Option], override: bool = False) -> None:
    """A flag per option. `override`: flags that set a value over a cluster file's, so not given is None."""
    for o in options:
        if override:
            fallback = f", or {o.default}" if o.default is not None else ""
            helptext = f"{o.help}; sets every pool's (default: the cluster file's{fallback})"
        elif o.switch:
            helptext = f"{o.help}; {'on by default, this turns it off' if o.default else 'off by default'}"
        else:
            helptext = o.help + (f"; default {o.default}" if o.default is not None else "")
        default = None if override else o.default
        if o.switch:
            parser.add_argument(o.flag, dest=o.name, action="store_const", const=not o.default, default=default,
                                help=helptext)
        elif typing.get_origin(o.type) is Literal:
            parser.add_argument(o.flag, dest=o.name, default=default, choices=typing.get_args(o.type), help=helptext)
        else:
            parser.add_argument(o.flag, dest=o.name, default=default, type=None if o.type is str else o.type,
                                help=helptext)


def given(args: argparse.Namespace, options: Iterable[Option] | None = None) -> dict[str, Any]:
    """The option values parsed flags carry, by name (the options these flags have, by default)."""
    return {o.name: getattr(args, o.name) for o in options or engine_options() if hasattr(args, o.name)}


def engine_config(model: str, values: Mapping[str, Any]) -> EngineConfig:
    """An EngineConfig from option values by name (parsed flags, a pool's keys); every other field keeps
    its default. Each struct checks its values as it is built (ValueError)."""
    tree: dict[str, Any] = {}
    for o in engine_options():
        if o.name in values:
            v = values[o.name]
            *sections, leaf = o.path
            functools.reduce(lambda d, s: d.setdefault(s, {}), sections, tree)[leaf] = \
                o.parse(v) if o.parse and v is not None else v
    return _build(EngineConfig, {**tree, "model": model})


def _build(cls, tree: dict[str, Any]):
    hints = typing.get_type_hints(cls)
    return cls(**{k: _build(hints[k], v) if isinstance(v, dict) else v for k, v in tree.items()})


def to_argv(values: Mapping[str, Any], options: Iterable[Option] | None = None) -> list[str]:
    """The flags that hand these option values to `cluster worker` (None: left to the worker's default)."""
    argv: list[str] = []
    for o in options or engine_options():
        v = values.get(o.name)
        if v is None:
            continue
        if o.switch:
            argv += [o.flag] if v != o.default else []
        else:
            argv += [o.flag, str(v)]
    return argv
