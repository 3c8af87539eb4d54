"""The dependency rule of docs/architecture.md, checked on the source by reading every import.

Packages import only downward: config <- data <- models <- losses <- stages <- training <- top, and
models <- inference <- {serve, eval} <- top, with `clients` (HTTP) below inference and eval. The shapes world
(`shapes`, above data) is imported only by the top and by SHAPES_USERS. The leaf
modules (errors, paths, publish, progress) import nothing of ours and may be imported anywhere. Imports inside
functions count as much as those at the top of a file: a lazy import is still a dependency.

KNOWN_UPWARD lists the edges that still break the rule (issue 12 is removing them); the test fails on any
edge not in it, and on a listed edge that is gone, so the list stays true.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "reasonedit"

LEAVES = {"errors", "paths", "publish", "progress"}
TOP = {"cli", "experiment", "sweep", "__main__", "__init__"}
DEPENDS = {  # package -> the packages directly below it
    "config": set(),
    "data": {"config"},
    "models": {"data"},
    "losses": {"models"},
    "stages": {"losses"},
    "training": {"stages"},
    "shapes": {"data"},
    "clients": set(),
    "inference": {"models", "clients"},
    "serve": {"inference"},
    "eval": {"inference"},
    "testing": {"serve"},  # the chat server stands alone; the fuzz tier reads the service's limits
}

# The shapes world stands beside data (it makes records) and is reached only by the demo's parts: the tiny reasoner's
# reading stand-in, the tiny VAE's training, the exact shapes editor, the held-out ablation and the shapes benchmark.
SHAPES_USERS = {"reasonedit/stages/pretrain.py", "reasonedit/training/vae.py", "reasonedit/inference/pipeline.py",
                "reasonedit/eval/heldout.py", "reasonedit/eval/benchmarks/shapes.py"}

KNOWN_UPWARD: set[tuple[str, str]] = set()

KNOWN_CYCLES: set[frozenset[str]] = set()


def allowed(package: str) -> set[str]:
    """Every package `package` may import: its closure under DEPENDS, the leaves and itself."""
    if package in TOP:
        return set(DEPENDS) | LEAVES | TOP
    if package in LEAVES:
        return {package}
    out, todo = {package}, [package]
    while todo:
        for below in DEPENDS[todo.pop()]:
            if below not in out:
                out.add(below)
                todo.append(below)
    return out | LEAVES


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path, path: Path, modules: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for each reasonedit import in `path`; a name that is
    itself a module (`from reasonedit.eval import runner`) counts as an import of that module."""
    package = module_name(root, path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "reasonedit"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "reasonedit":
                continue
            names = [a.name for a in node.names]
            out += [(f"{target}.{n}", [], node.lineno) for n in names if f"{target}.{n}" in modules]
            names = [n for n in names if f"{target}.{n}" not in modules]
            if names:
                out.append((target, names, node.lineno))
    return out


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def scan(root: Path = ROOT) -> tuple[set[tuple[str, str]], list[str], dict[str, set[str]]]:
    """(upward edges as (file, module), calls of another module's private names, module graph)."""
    upward, private, graph = set(), [], {}
    modules = {module_name(root, p) for p in root.rglob("*.py")}
    for path in sorted(root.rglob("*.py")):
        here = module_name(root, path)
        rel = path.relative_to(root.parent).as_posix()
        pkg = package_of(here)
        for target, names, line in imports(root, path, modules):
            target_pkg = package_of(target)
            if target_pkg not in allowed(pkg) and not (target_pkg == "shapes" and rel in SHAPES_USERS):
                upward.add((rel, target))
            private += [f"{rel}:{line} takes {n} from {target}" for n in names
                        if n.startswith("_") and not n.startswith("__") and target != here]
            while target not in modules and "." in target:  # `from pkg.mod import name`: the module
                target = target.rsplit(".", 1)[0]
            if target != here:
                graph.setdefault(here, set()).add(target)
    return upward, private, graph


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.add(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_package_is_placed_in_the_rule():
    packages = {package_of(module_name(ROOT, p)) for p in ROOT.rglob("*.py")}
    assert packages <= set(DEPENDS) | LEAVES | TOP, sorted(packages - set(DEPENDS) - LEAVES - TOP)


def test_imports_go_down_only():
    upward, _, _ = scan()
    assert not upward - KNOWN_UPWARD, "imports against docs/architecture.md:\n" + "\n".join(
        f"  {f} imports {m}" for f, m in sorted(upward - KNOWN_UPWARD))
    assert not KNOWN_UPWARD - upward, "gone, remove from KNOWN_UPWARD:\n" + "\n".join(
        f"  {f} -> {m}" for f, m in sorted(KNOWN_UPWARD - upward))


def test_no_module_takes_another_modules_private_names():
    _, private, _ = scan()
    assert not private, "\n".join(private)


def test_no_import_cycles_but_the_known_ones():
    found = cycles(scan()[2])
    assert found == KNOWN_CYCLES, {"new": [sorted(c) for c in found - KNOWN_CYCLES],
                                   "gone": [sorted(c) for c in KNOWN_CYCLES - found]}


def test_a_planted_upward_import_is_caught(tmp_path):
    copy = tmp_path / "reasonedit"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "data" / "corpus.py", "a") as f:
        f.write("\n\ndef _planted():\n    from reasonedit.training.trainer import train_stage\n    from ..eval.judge import _x\n")
    with open(copy / "inference" / "types.py", "a") as f:
        f.write("\nfrom reasonedit.eval import runner\n")
    with open(copy / "models" / "prompts.py", "a") as f:  # the shapes world, from a module that is not a demo part
        f.write("\nfrom reasonedit.shapes.world import Scene\n")
    upward, private, graph = scan(copy)
    assert upward - KNOWN_UPWARD == {("reasonedit/data/corpus.py", "reasonedit.training.trainer"),
                                     ("reasonedit/data/corpus.py", "reasonedit.eval.judge"),
                                     ("reasonedit/inference/types.py", "reasonedit.eval.runner"),
                                     ("reasonedit/models/prompts.py", "reasonedit.shapes.world")}
    assert any("takes _x from reasonedit.eval.judge" in p for p in private)
    assert any("reasonedit.inference.types" in c and "reasonedit.eval.runner" in c for c in cycles(graph))
