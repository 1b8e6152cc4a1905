"""The control plane (common/, coordinator/, gateway/) never loads torch: every module of theirs is
imported in a fresh interpreter, which must end with no torch in sys.modules. import-linter checks the
static import graph in CI (pyproject's [tool.importlinter]); this checks what really gets loaded."""

import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TORCH_FREE = ("common", "coordinator", "gateway")


def modules(package: str) -> list[str]:
    names = [package]
    for info in pkgutil.walk_packages([str(ROOT / package)], prefix=package + "."):
        names.append(info.name)
    return names


def test_control_plane_modules_are_found():
    mods = [m for p in TORCH_FREE for m in modules(p)]
    for expected in ("common.messages", "common.etcd.session", "coordinator.server", "gateway.server",
                     "gateway.openai_api"):
        assert expected in mods


def test_control_plane_never_loads_torch():
    mods = [m for p in TORCH_FREE for m in modules(p)]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n"
            "    importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"torch loaded by the control plane: {out.stdout.strip()[:300]}"


def test_every_module_imports():
    mods = [m for p in ("engine", "common", "kvtransfer", "prefill", "decode", "coordinator", "gateway",
                        "cluster") for m in modules(p)]
    code = "import importlib\n" + f"for m in {mods!r}:\n    importlib.import_module(m)\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
