"""The structure stays true: the import-linter layers contract (pyproject.toml), argument parsing only in
ifseg_rt.cli, one owner per shared constant, and the torch-free modules import (and run) without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ifseg_rt"


def test_layers_contract():
    """Every import (module level or inside a function) points down the layers of pyproject.toml."""
    pytest.importorskip("importlinter")
    code = ("import sys\nfrom importlinter.cli import lint_imports\n"
            f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "1 kept, 0 broken" in r.stdout, r.stdout[-2000:]


def test_layers_contract_catches_an_upward_import(tmp_path):
    """The contract is not vacuous: a runtime module that imports the cli layer breaks it."""
    pytest.importorskip("importlinter")
    import shutil

    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "ifseg_rt", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    (copy / "ifseg_rt" / "runtime" / "upward.py").write_text("from ..cli import args  # noqa: F401\n")
    code = ("import sys\nsys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in type(f).__name__ and "
            "'ScikitBuild' not in type(f).__name__]\n"
            f"sys.path.insert(0, {str(copy)!r})\n"
            "from importlinter.cli import lint_imports\n"
            f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=copy, timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "ifseg_rt.runtime.upward" in r.stdout and "ifseg_rt.cli" in r.stdout, r.stdout[-2000:]


def _python_files():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_argument_parsing_only_in_cli():
    """``argparse.ArgumentParser`` / ``ArgumentTypeError`` appear only under ifseg_rt/cli."""
    offenders = []
    for path in _python_files():
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("ArgumentParser", "ArgumentTypeError",
                                                                 "add_argument"):
                offenders.append(f"{rel}:{node.lineno} {node.attr}")
    assert not offenders, offenders


def _string_constants(value: str):
    hits = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value == value:
                hits.append(str(path.relative_to(PACKAGE)))
    return hits


@pytest.mark.parametrize("value,owner", [("model.safetensors", "files.py"), ("run.json", "files.py"),
                                         ("ifseg.json", "runtime/model_dir.py")])
def test_file_names_have_one_owner(value, owner):
    """A file name shared between modules is spelled once, by its owner; the rest import the constant."""
    assert _string_constants(value) == [owner]


@pytest.mark.parametrize("names,owner", [
    (("auto", "onnxruntime", "openvino", "torch", "tensorrt"), "runtime/backends/__init__.py"),
    (("fp32", "fp16", "bf16", "int8"), "runtime/model_dir.py"),
    (("auto", "cuda", "cuda-compiled", "cuda-nvrtc", "cpu", "numpy"), "knn/__init__.py"),
])
def test_choice_lists_have_one_owner(names, owner):
    """The backend / precision / kNN-backend lists are written once; the CLI builds its choices from them."""
    hits = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.elts) \
                    and set(e.value for e in node.elts) == set(names):
                hits.append(str(path.relative_to(PACKAGE)))
    assert hits == [owner]


def test_cli_choices_come_from_the_owners():
    import argparse

    from ifseg_rt.cli.eval import build_parser
    from ifseg_rt.knn import BACKENDS as KNN_BACKENDS
    from ifseg_rt.runtime.backends import BACKENDS
    from ifseg_rt.runtime.model_dir import PRECISIONS

    actions = {a.dest: a for a in build_parser()._actions if isinstance(a, argparse.Action)}
    assert tuple(actions["knn_backend"].choices) == KNN_BACKENDS  # cuda-compiled / cuda-nvrtc selectable
    assert tuple(actions["backend"].choices) == BACKENDS
    assert tuple(actions["precision"].choices) == PRECISIONS


def test_cuda_k_limit_is_the_kernels():
    """MAX_K (settings), the kernel source's IFSEG_KNN_MAX_L and the compiled extension agree."""
    import re

    from ifseg_rt.knn import kernel_source
    from ifseg_rt.knn.settings import MAX_K

    macro = int(re.search(r"#define IFSEG_KNN_MAX_L (\d+)", kernel_source()).group(1))
    assert MAX_K == macro + 1
    _C = pytest.importorskip("ifseg_rt._C")
    assert _C.knn_cuda_max_k == MAX_K


# module -> a smoke call run after importing it with torch (and ray, pyarrow) unimportable
TORCH_FREE = {
    "ifseg_rt": "ifseg_rt.__version__",
    "ifseg_rt.runtime": "ifseg_rt.runtime.Segmenter",
    "ifseg_rt.runtime.outputs": "",
    "ifseg_rt.runtime.inputs": "",
    "ifseg_rt.knn": ("f = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32); "
                     "p = np.full((20, 4), 0.25, np.float32); "
                     "assert ifseg_rt.knn.knn_average(f, p).shape == (20, 4); "
                     "assert ifseg_rt.knn.knn_average(f, p, backend='numpy').shape == (20, 4)"),
    "ifseg_rt.runtime.resize_argmax": ("assert ifseg_rt.runtime.resize_argmax.resize_argmax("
                                       "np.ones((4, 2), np.float32), (2, 2), (3, 3)).shape == (3, 3)"),
    "ifseg_rt.evaluate": "",
    "ifseg_rt.benchmark": "",
    "ifseg_rt.distributed": "",
    "ifseg_rt.world": "ifseg_rt.world.render_scene(0, 32)",
    "ifseg_rt.serve.client": "from ifseg_rt.serve import Client, export_repository, serve",
    "ifseg_rt.serve.server": "",
    "ifseg_rt.serve.repository": "",
    "ifseg_rt.serve.triton_models": "",
    "ifseg_rt.serve.tritonserver": "",
    "ifseg_rt.cli": "assert ifseg_rt.cli.cli(['--help']) == 0",
    "ifseg_rt.cli.segment": "",
    "ifseg_rt.cli.bench": "",
    "ifseg_rt.cli.eval": "",
    "ifseg_rt.cli.serve": "",
    "ifseg_rt.cli.download": "",
}


@pytest.mark.parametrize("module", sorted(TORCH_FREE))
def test_imports_without_torch(module):
    code = ("import sys\n"
            "for name in ('torch', 'ray', 'pyarrow'): sys.modules[name] = None  # importing them raises now\n"
            f"import numpy as np, importlib, ifseg_rt\nimportlib.import_module({module!r})\n"
            f"import {module}\n{TORCH_FREE[module]}\n"
            "assert not [m for m in ('torch', 'ray', 'pyarrow') if sys.modules[m] is not None]\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
