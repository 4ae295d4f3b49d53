"""The house rules, checked on the source tree: imports point one way, every third-party import is a
declared dependency, functions stay short, importing scalr sets no global state."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages", "storage")
# Layers of stages/, top to bottom: a module imports only from lower layers or its own folder.
# extract/ and student/ share a layer and never import each other; runtime and recipes (the
# released recipes as data) share the lowest.
LAYERS = {"cli": 4, "tools": 3, "downstream": 2, "extract": 1, "student": 1, "runtime": 0, "recipes": 0}
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("**/*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path) -> list[str]:
    """Absolute module names imported anywhere in a file."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def room(module: str) -> str | None:
    """The layer name of a stages module (cli, tools, downstream, extract, student, runtime)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "stages" and len(parts) > 1 else None


def violations(module: str, names: list[str]) -> list[str]:
    """What is wrong with `module` importing `names`."""
    wrong = []
    top = module.split(".")[0]
    for name in names:
        target = name.split(".")[0]
        if top == "pipeline" and target in ("stages", "storage"):
            wrong.append(f"{module} -> {name}: pipeline/ imports nothing of stages/ or storage/")
        elif top == "storage" and target == "stages":
            wrong.append(f"{module} -> {name}: storage/ imports nothing of stages/")
        elif top == target == "stages" and room(module) and room(name) and room(module) != room(name):
            if LAYERS[room(name)] >= LAYERS[room(module)]:
                wrong.append(f"{module} -> {name}: {room(module)}/ may not import {room(name)}/")
    return wrong


def test_imports_point_one_way():
    wrong = [w for module, path in modules().items() for w in violations(module, imports_of(path))]
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_can_fail():
    assert violations("stages.extract.teachers", ["stages.student.waffleiron"])  # siblings
    assert violations("stages.student.train", ["stages.tools.runs"])  # upwards
    assert violations("storage.layout", ["stages.runtime"]) and violations("pipeline.scan", ["storage.layout"])
    assert not violations("stages.downstream.segment", ["stages.student.train", "stages.runtime", "storage.runs"])
    assert violations("stages.recipes", ["stages.student.train"]) and violations("stages.runtime", ["stages.recipes"])


def declared(requirements: list[str]) -> set[str]:
    names = set()
    for requirement in requirements:
        name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]
        names.add(name.lower().replace("_", "-"))
        if "[distributed]" in requirement:
            names.add("distributed")
    return names


def third_party(paths: list[Path]) -> dict[str, set[str]]:
    """Distribution -> the files importing it."""
    distributions = md.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in paths:
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in (*PACKAGES, "tests", "helpers", "__future__"):
                continue
            for dist in distributions.get(top, [top]):
                found.setdefault(dist.lower().replace("_", "-"), set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_import_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = declared(project["dependencies"])
    optional = declared([r for extra in project["optional-dependencies"].values() for r in extra])
    library = third_party(list(modules().values()))
    tests = third_party(sorted((ROOT / "tests").glob("*.py")))
    missing = {dist: files for dist, files in library.items() if dist not in runtime}
    # optional: tensorboard is imported where events are written, and only when installed
    missing = {dist: files for dist, files in missing.items() if dist not in optional}
    missing_in_tests = {dist: files for dist, files in tests.items() if dist not in runtime | optional}
    assert not missing and not missing_in_tests, (missing, missing_in_tests)


def test_functions_are_short_outside_the_synthetic_world():
    long = []
    for module, path in modules().items():
        if module.startswith("pipeline.synth"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "\n".join(long)


@pytest.mark.parametrize("package", PACKAGES)
def test_importing_sets_no_global_state(package):
    """Importing every module picks no matplotlib backend, loads no pyplot and leaves torch's
    global generator and thread count as they were."""
    names = [m for m in modules() if m.split(".")[0] == package and not m.endswith("__main__")]
    code = (
        "import importlib, sys, torch, matplotlib\n"
        "state, threads = torch.get_rng_state(), torch.get_num_threads()\n"
        "backend = matplotlib.rcParams._get('backend')\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
        "assert matplotlib.rcParams._get('backend') == backend, 'backend chosen'\n"
        "assert torch.equal(state, torch.get_rng_state()), 'torch RNG changed'\n"
        "assert threads == torch.get_num_threads(), 'thread count changed'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
