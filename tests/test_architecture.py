"""The layout's rules, read from the source: no import runs back up the layers, and no long functions.

Layers, bottom to top: config, losses and small utilities; models (and `checkpoints`, which builds them from
files); data; lit; eval; pipelines (and cluster); cli with the package's public front door. A module may
import its own layer or below. Two rooms have a narrower job than their layer allows: `data/` reads and
writes data (it runs no model), and `eval/` measures (it trains nothing).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "nativetok"

LAYERS: Dict[str, int] = {
    "nativetok.config": 0, "nativetok.losses": 0, "nativetok.io": 0, "nativetok.precision": 0,
    "nativetok.version": 0, "nativetok.pixels": 0, "nativetok.progress": 0,
    "nativetok.models": 1, "nativetok.checkpoints": 1,
    "nativetok.data": 2,
    "nativetok.lit": 3,
    "nativetok.eval": 4,
    "nativetok.pipelines": 5, "nativetok.cluster": 5,
    "nativetok.cli": 6, "nativetok.__main__": 6, "nativetok": 6,
}
# Imports a room may not make although its layer would allow them.
NARROWER = {
    "nativetok.data": ("nativetok.models", "nativetok.checkpoints"),
    "nativetok.eval": ("nativetok.lit.train",),
}
MAX_FUNCTION_LINES = 60
LONGER_ALLOWED = {("cli.py", "build_parser")}  # the CLI's argument table reads best as one list


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(name: str) -> str:
    """The longest key of LAYERS that `name` is or lies under."""
    candidates = [key for key in LAYERS if name == key or (key != "nativetok" and name.startswith(key + "."))]
    assert candidates, f"{name} is in no layer: add its room to LAYERS (and to the README's layout section)"
    return max(candidates, key=len)


def imports(name: str, source: str, is_package: bool = False) -> Iterator[Tuple[int, str]]:
    """(line, module) for every nativetok import of module `name`, at any depth (lazy imports count too)."""
    package = name if is_package else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target]
            if target == "nativetok":  # `from nativetok import x`: x may be a module of the package
                targets = [f"nativetok.{a.name}" if (PACKAGE / a.name).exists() or (PACKAGE / f"{a.name}.py").exists()
                           else "nativetok" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            if target == "nativetok" or target.startswith("nativetok."):
                yield node.lineno, target


def sources():
    return sorted(PACKAGE.rglob("*.py"))


def problems(name: str, source: str, is_package: bool = False) -> List[str]:
    """What module `name` (with this source) imports against the rules, one line per import."""
    mine, found = room(name), []
    for line, target in imports(name, source, is_package):
        theirs = room(target)
        if LAYERS[theirs] > LAYERS[mine]:
            found.append(f"{name}:{line}: {mine} (layer {LAYERS[mine]}) imports {target} (layer {LAYERS[theirs]})")
        for narrow, forbidden in NARROWER.items():
            if mine == narrow and any(target == f or target.startswith(f + ".") for f in forbidden):
                found.append(f"{name}:{line}: {narrow} may not import {target}")
    return found


def test_no_import_runs_up_the_layers():
    found = [p for path in sources() for p in problems(module_name(path), path.read_text(), path.name == "__init__.py")]
    assert not found, "imports against the layering:\n" + "\n".join(found)


def test_the_checker_finds_upward_narrower_and_relative_imports():
    assert problems("nativetok.lit.example", "from nativetok.eval.fid import evaluate_fid") != []
    assert problems("nativetok.lit.example", "def f():\n    import nativetok.pipelines.compare") != []
    assert problems("nativetok.lit.example", "from ..eval import fid") != []
    assert problems("nativetok.lit.example", "from nativetok import load_tokenizer") != []  # the front door is on top
    assert problems("nativetok.data.example", "from nativetok.checkpoints import load_tokenizer") != []
    assert problems("nativetok.eval.example", "from nativetok.lit.train import train_tokenizer") != []
    assert problems("nativetok.eval.example", "from nativetok.lit.ema import EMA\nfrom ..models import x") == []
    assert problems("nativetok.pipelines.example", "from nativetok.eval.fid import evaluate_fid") == []


def test_no_function_is_longer_than_the_limit():
    long = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (path.name, node.name) not in LONGER_ALLOWED:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def module_graph() -> Dict[str, set]:
    """module -> the package's modules it imports (lazy imports included), by file."""
    names = {module_name(path): path for path in sources()}
    graph = {}
    for name, path in names.items():
        targets = {target for _, target in imports(name, path.read_text(), path.name == "__init__.py")}
        graph[name] = {target for target in targets if target in names and target != name}
    return graph


def circles(graph: Dict[str, set]) -> List[List[str]]:
    """Every import circle, found by a depth-first walk (each circle once, from its first module found)."""
    found, state = [], {}

    def walk(name: str, path: List[str]) -> None:
        state[name] = "open"
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                walk(target, path + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    return found


def test_no_modules_import_each_other_in_a_circle():
    assert circles(module_graph()) == []
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_walkthrough_is_on_the_readmes_first_screen_and_names_only_files_that_exist():
    root = PACKAGE.parents[1]
    assert "docs/architecture.md" in "\n".join((root / "README.md").read_text().splitlines()[:60])
    text = (root / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`([\w/]+\.(?:py|yaml))", text))
    assert len(named) > 15
    missing = [name for name in named if not ((PACKAGE / name).is_file() or (root / name).is_file())]
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
