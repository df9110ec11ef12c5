"""The import graph points one way: entry points (``train.py``, ``scripts/``) -> the training
engine -> evaluation and inference -> models, data, metrics, loggers, losses ... -> leaf
utilities. Every ``segexp.*`` import counts, those inside functions (lazy imports) included, so a
lower layer never reaches up, not even lazily. A new module must be given a layer here."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

# Module (or package) -> layer. A module may import its own layer and those below it, never a
# higher one. A package's entry covers its modules.
LAYERS: dict[str, int] = {
    # 0: leaf utilities, importing no other layer
    "segexp": 0,  # the package itself
    "segexp.errors": 0,
    "segexp.atomic": 0,
    "segexp.runtime": 0,
    "segexp.weights_io": 0,
    "segexp.profiling": 0,
    # 1: the parts an experiment is composed of
    "segexp.config": 1,
    "segexp.convert": 1,
    "segexp.nn": 1,
    "segexp.backbones": 1,
    "segexp.heads": 1,
    "segexp.models": 1,
    "segexp.data": 1,
    "segexp.metrics": 1,
    "segexp.losses": 1,
    "segexp.losses_mask": 1,
    "segexp.loggers": 1,
    "segexp.optim": 1,
    "segexp.reports": 1,
    "segexp.visualize": 1,
    # 2: running a model over images and data sets (validation during training uses it too)
    "segexp.inference": 2,
    # 3: the training assembly
    "segexp.engine": 3,
    # 4: command-line entry points inside the package
    "segexp.cli": 4,
}
ENGINE = "segexp.engine"
ENTRY_POINTS = ("train", "scripts", "tests")  # top-level names the package must never import


def layer_of(module: str) -> int | None:
    """The layer of the longest entry ``module`` starts with (``segexp`` alone matches only the
    package itself: a new top-level module must be placed)."""
    if module == "segexp":
        return LAYERS["segexp"]
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        layer = LAYERS.get(".".join(parts[:end]))
        if layer is not None:
            return layer
    return None


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(module: str, source: str, is_package: bool = False,
                     known: set[str] | None = None) -> set[str]:
    """Every module ``source`` imports, anywhere in it; relative imports resolved against
    ``module``. ``from a import b`` gives ``a`` and, where ``b`` is a module (in ``known``, or
    always without it), ``a.b``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".")
                if not is_package:
                    package = package[:-1]
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            names = {f"{target}.{alias.name}" for alias in node.names if alias.name != "*"}
            found.update(names if known is None else names & known)
    return found


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Broken rules in ``{module: (source, is_package)}``, one line each."""
    problems = []
    for module, (source, is_package) in sorted(sources.items()):
        own = layer_of(module)
        if own is None:
            problems.append(f"{module}: not in LAYERS (tests/test_layout.py); give it a layer")
            continue
        for target in sorted(imported_modules(module, source, is_package, set(sources))):
            top = target.split(".")[0]
            if top in ENTRY_POINTS:
                problems.append(f"{module} imports {target}: the package never imports an entry "
                                "point")
                continue
            if top != "segexp":
                continue
            if (target == ENGINE or target.startswith(ENGINE + ".")) and not (
                    module == ENGINE or module.startswith(ENGINE + ".") or own > LAYERS[ENGINE]):
                problems.append(f"{module} imports {target}: only the engine and entry points "
                                "import segexp.engine")
                continue
            theirs = layer_of(target)
            if theirs is not None and theirs > own:
                problems.append(f"{module} (layer {own}) imports {target} (layer {theirs})")
    return problems


def package_sources() -> dict[str, tuple[str, bool]]:
    return {module_name(path, ROOT): (path.read_text(), path.name == "__init__.py")
            for path in sorted((ROOT / "segexp").rglob("*.py"))}


def test_imports_point_one_way():
    sources = package_sources()
    assert len(sources) > 50  # the whole package was read
    assert "segexp.weights_io" in sources and "segexp.runtime" in sources
    problems = violations(sources)
    assert not problems, "\n".join(problems)


def test_leaf_modules_import_only_leaf_modules():
    sources = package_sources()
    leaves = [m for m in sources if layer_of(m) == 0]
    assert {"segexp.errors", "segexp.runtime", "segexp.weights_io", "segexp.profiling"} <= set(leaves)
    for module in leaves:
        imports = {t for t in imported_modules(module, *sources[module]) if t.startswith("segexp.")}
        assert all(layer_of(t) == 0 for t in imports), (module, imports)


def test_a_violating_module_is_caught():
    sources = package_sources()
    fake = {
        # a lazy import, inside a function, of the engine from a model module
        "segexp.models.fake": ("def f():\n    from segexp.engine.trainer import fit\n", False),
        # a leaf reaching up (relative import)
        "segexp.runtime": ("from .models import build_model\n", False),
        # inference (layer 2) reaching the engine with a plain import
        "segexp.inference": ("import segexp.engine.experiment\n", False),
        # the package importing an entry point
        "segexp.data.fake": ("from scripts.evaluate import main\n", False),
        # a module nobody placed
        "segexp.newthing": ("import torch\n", False),
    }
    problems = violations({**sources, **fake})
    for module in fake:
        assert any(p.startswith(module + " ") or p.startswith(module + ":") for p in problems), \
            (module, problems)
    assert "segexp.runtime (layer 0) imports segexp.models (layer 1)" in problems
    # and the same modules as they really are break no rule
    assert not violations(sources)


def test_relative_imports_resolve_to_their_modules():
    assert imported_modules("segexp.data.folder", "from .base import read_image\n") >= {
        "segexp.data.base", "segexp.data.base.read_image"}
    assert imported_modules("segexp.data", "from . import folder\n", is_package=True) == {
        "segexp.data", "segexp.data.folder"}
    assert imported_modules("segexp.models.weights", "from ..engine import trainer\n") == {
        "segexp.engine", "segexp.engine.trainer"}


# Hydra's runtime (the job's choices, overrides, output folder) is read at the entry points only
# (segexp.cli.train.hydra_launch): the engine takes a plain config and a Launch record.
HYDRA_RUNTIME = ("hydra.core", "hydra.types", "hydra.main", "hydra._internal")


def hydra_runtime_imports(module: str, source: str, is_package: bool) -> set[str]:
    return {t for t in imported_modules(module, source, is_package)
            if t == "hydra" or t.startswith(HYDRA_RUNTIME)} | (
        {"HydraConfig"} if "HydraConfig" in source else set())


def test_the_engine_does_not_read_hydras_runtime():
    sources = package_sources()
    engine = {m: s for m, s in sources.items() if m == ENGINE or m.startswith(ENGINE + ".")}
    assert {"segexp.engine.experiment", "segexp.engine.trainer"} <= set(engine)
    found = {m: hydra_runtime_imports(m, *s) for m, s in engine.items()}
    assert not any(found.values()), {m: f for m, f in found.items() if f}
    # the check sees such an import where there is one
    assert hydra_runtime_imports("segexp.cli.train", *sources["segexp.cli.train"])
