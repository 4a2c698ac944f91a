"""The service types and the app's first screen import without torch or transformers (as harlequin tests its
import hygiene): the app shows its loading screen at once and pays for torch in the loading thread only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "accelerate", "bitsandbytes", "safetensors")
LIGHT_MODULES = [
    "backend",
    "backend.service",
    "backend.errors",
    "tui.__main__",
    "tui.app",
    "tui.errors",
    "tui.store",
    "tui.screens.loading",
    "tui.screens.chat",
]


def _heavy_after_importing(module: str) -> list[str]:
    code = (
        f"import importlib, json, sys; importlib.import_module({module!r}); "
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_first_screen_modules_import_without_torch(module):
    assert _heavy_after_importing(module) == [], f"importing {module} pulls in heavy libraries"


def test_the_model_classes_still_come_from_backend():
    """``from backend import ChatGLMConfig`` keeps working; it is the import that brings transformers in."""
    assert "transformers" in _heavy_after_importing("backend.configuration")


def test_an_8bit_load_and_reply_do_not_import_bitsandbytes(tmp_path):
    """bitsandbytes compiles its ops with torch.compile when imported (seconds before the first token); 8-bit
    is our own weight-only int8, so only 4-bit loading may import it."""
    from helpers_tiny import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path / "model")
    code = (
        "import sys; from backend.engine import ChatEngine; from backend.service import SamplingParams; "
        f"e = ChatEngine.load(model={str(model_dir)!r}, quantization='8bit', device='cpu'); "
        "list(e.stream_reply('hi', [], SamplingParams(temperature=0, max_new_tokens=3))); "
        "print(e.info.precision, 'bitsandbytes' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["8bit", "False"]


# what backend/kernels/ may import from the rest of backend at run time: leaves that import nothing of backend
KERNEL_LEAVES = {"cuda_streams", "user_cache"}


def _runtime_imports_above(path: Path, level: int = 2) -> list[str]:
    """Modules of backend outside ``path``'s package that it imports when run, relative imports counted from
    ``level`` dots (2 for backend/kernels/, 1 for backend/); imports under TYPE_CHECKING are for annotations only
    and do not count."""
    import ast

    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and id(node) not in typing_only and node.level >= level:
            found.append(node.module or ", ".join(alias.name for alias in node.names))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("backend."):
            if not node.module.startswith("backend.kernels") and id(node) not in typing_only:
                found.append(node.module.split(".", 1)[1])
    return found


def test_kernels_import_nothing_above_them():
    """The kernels are the lowest floor (docs/architecture.md): they may use the leaf plumbing, never the
    modules that build on them (a cycle waiting to happen, and a kernel that cannot be read alone)."""
    for path in sorted((ROOT / "backend" / "kernels").glob("*.py")):
        above = [m for m in _runtime_imports_above(path) if m.split(".")[0] not in KERNEL_LEAVES]
        assert above == [], f"{path.name} imports {above} from above backend/kernels"
    assert all(_runtime_imports_above(ROOT / "backend" / f"{leaf}.py", level=1) == [] for leaf in KERNEL_LEAVES)
