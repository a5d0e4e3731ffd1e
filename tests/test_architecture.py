"""The package's shape, enforced: imports point down the layers, functions fit on a screen, no block is
written twice, and importing the package (or asking the command for help) loads nothing heavy."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_aevb"

#: layer -> the layers it may import (its own always). The README's "How the code is laid out" says the same.
ALLOWED = {
    "version": set(),
    "errors": set(),
    "data": {"errors"},
    "plots": set(),
    "graphs": set(),
    "generative": {"errors"},
    "infer": {"errors"},
    "evaluation": {"errors", "infer", "graphs"},
    "config": {"errors", "data", "generative", "infer"},
    "training": {"version", "errors", "data", "plots", "graphs", "generative", "infer", "evaluation", "config"},
    "commands": {"version", "errors", "data", "plots", "graphs", "generative", "infer", "evaluation", "config",
                 "training"},
}
TOP = {"__init__", "__main__"}  # the package's face: may import any layer, and nothing imports it

MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    """``pyro_aevb.x.y`` -> path, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def layer(module: str) -> str:
    """The layer of ``pyro_aevb.LAYER[...]``; the package itself (``__init__``) is TOP."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(module: str, path: Path):
    """(imported module, imported names, line) for every import in the file, at any depth (lazy ones too)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, [a.name for a in node.names], node.lineno


def test_every_module_has_a_layer():
    unknown = {m for m in modules() if layer(m) not in ALLOWED and layer(m) not in TOP}
    assert not unknown, f"modules outside the layers of ALLOWED: {sorted(unknown)}"


def test_imports_point_down_the_layers_only():
    all_modules = modules()
    wrong = []
    for module, path in all_modules.items():
        here = layer(module)
        if here in TOP:
            continue
        for target, names, line in imports(module, path):
            if not target.startswith("pyro_aevb"):
                continue
            targets = [target] if target != "pyro_aevb" else [f"pyro_aevb.{n}" for n in names]
            for t in targets:
                there = layer(t)
                if there != here and there not in ALLOWED[here]:
                    wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({here}) imports {t} ({there})")
    assert not wrong, "imports that point up or across a layer:\n" + "\n".join(wrong)


def test_no_private_name_is_imported_from_another_module():
    wrong = []
    for module, path in modules().items():
        for target, names, line in imports(module, path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if target.startswith("pyro_aevb") and private:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {private} from {target}")
    assert not wrong, "\n".join(wrong)


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # docstring and decorators' lines included
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


#: lines that any two functions may share: blank, comments, brackets, keyword parameters with defaults
_THIN = re.compile(r"^(#.*|[\)\]\}]+[,:]?( ->.*)?|\*{0,2}\w+(: [^=]+)?( = .+)?,|\w+=\w+,|\"\"\"|pass|return)?$")


def test_no_block_of_six_lines_is_written_twice():
    """A block of six or more consecutive lines (whitespace aside) stands in one place only."""
    windows = defaultdict(list)
    for path in modules().values():
        lines = [(i + 1, line.strip()) for i, line in enumerate(path.read_text().splitlines())]
        code = [(n, text) for n, text in lines if text and not _THIN.match(text)]
        for k in range(len(code) - 5):
            block = tuple(text for _, text in code[k : k + 6])
            windows[block].append(f"{path.relative_to(PACKAGE.parent)}:{code[k][0]}")
    repeated = [places for places in windows.values() if len(places) > 1]
    assert not repeated, "blocks of six lines written more than once:\n" + "\n".join(map(str, repeated))


def test_tomllib_is_imported_with_a_fallback_for_python_3_10():
    """``tomllib`` is in the standard library from 3.11 on; on 3.10 the project falls back to ``tomli``."""
    bare = []
    for path in modules().values():
        tree = ast.parse(path.read_text())
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try)
                   for n in ast.walk(ast.Module(body=t.body, type_ignores=[]))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "tomllib" for a in node.names) and id(node) not in guarded:
                bare.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and node.module == "tomllib" and id(node) not in guarded:
                bare.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not bare, f"tomllib imported without a try/except fallback: {bare}"


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_importing_the_package_loads_nothing_heavy():
    loaded = _python("import sys, pyro_aevb; print(sorted(m for m in ('torch', 'matplotlib', 'pyro.infer.mcmc') "
                     "if m in sys.modules))")
    assert loaded == "[]"


def test_the_library_leaves_matplotlib_and_the_allocator_alone():
    """Training and evaluating from Python pick no matplotlib backend and do not tune the allocator."""
    out = _python(
        "import matplotlib, pyro_aevb, torch\n"
        "from pyro_aevb.training.cpu_allocator import allocator_status\n"
        "backend = matplotlib.get_backend()\n"
        "import pyro_aevb.plots, pyro_aevb.training.loop\n"
        "vae = pyro_aevb.build_vae(pyro_aevb.Recipe(hidden_dim=8, latent_dim=2), 784)\n"
        "pyro_aevb.log_likelihood(vae.model, vae.guide, torch.rand(3, 784).bernoulli(), num_samples=10)\n"
        "print(matplotlib.get_backend() == backend, allocator_status().startswith(\"glibc's defaults\"))")
    assert out == "True True"


def test_help_answers_fast():
    times = []
    for _ in range(3):  # the fastest of three: the machine may be busy
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pyro_aevb", "--help"], capture_output=True, text=True,
                              timeout=60)
        times.append(time.perf_counter() - start)
        assert proc.returncode == 0 and "train" in proc.stdout
    assert min(times) < 2.0, times


@pytest.mark.parametrize("argv", [["--version"], ["train", "--help"]])
def test_the_command_answers(argv):
    proc = subprocess.run([sys.executable, "-m", "pyro_aevb", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ("pyro-aevb 0." in proc.stdout) if argv == ["--version"] else ("--resume" in proc.stdout)
