"""The package imports only downward, as docs/design.md's layer table draws it: every `import` of a qlorakit
module (at module level or inside a function) is parsed, and a unit may import only units listed before it.
Outside `kernels/`, the 4-bit kernels are reached through the dispatch point (`qlorakit.kernels`), never through
`kernels.triton_*` or `kernels.reference` directly."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "qlorakit"

# Bottom to top; a unit is a subpackage or a top-level module. The same order as docs/design.md's table.
LAYERS = ["errors", "logs", "atomic", "sharding", "assets", "quant", "kernels", "nn", "model", "data", "adapters",
          "optim", "config", "options", "memory", "infer", "train", "cli"]
ROOT_FILES = {"__init__", "__main__"}


def _unit(parts: tuple[str, ...]) -> str:
    return parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[tuple[str, ...], int]]:
    """(the imported qlorakit module as a path of names inside the package, line) for every import of path."""
    rel = path.relative_to(SRC).with_suffix("").parts
    package = rel[:-1] if rel[-1] != "__init__" else rel[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                mod = tuple(node.module.split(".")) if node.module else ()
                target = base + mod
                if not mod:  # from .. import x, y: each name is a module or a name of the package
                    out += [(target + (a.name,), node.lineno) for a in node.names]
                    continue
                out.append((target, node.lineno))
            elif node.module and node.module.split(".")[0] == "qlorakit":
                out.append((tuple(node.module.split(".")[1:]), node.lineno))
        elif isinstance(node, ast.Import):
            out += [(tuple(a.name.split(".")[1:]), node.lineno) for a in node.names
                    if a.name.split(".")[0] == "qlorakit"]
    return [(t, line) for t, line in out if t]


def _violations() -> list[str]:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("").parts
        src = _unit(rel)
        if src in ROOT_FILES:
            continue
        assert src in LAYERS, f"{path}: unit {src!r} is missing from LAYERS (and from docs/design.md's table)"
        for target, line in _imports(path):
            dst = _unit(target)
            if dst in ROOT_FILES or dst == src:
                continue
            if dst not in LAYERS:
                bad.append(f"{path.relative_to(SRC)}:{line} imports unknown unit {dst!r}")
            elif LAYERS.index(dst) > LAYERS.index(src):
                bad.append(f"{path.relative_to(SRC)}:{line}: {src} imports {'.'.join(target)} (a higher layer)")
            if dst == "kernels" and len(target) > 1 and (target[1].startswith("triton_") or
                                                         target[1] == "reference"):
                bad.append(f"{path.relative_to(SRC)}:{line}: {src} reaches past the dispatch point into "
                           f"{'.'.join(target)}")
    return bad


def test_every_import_goes_downward():
    assert _violations() == []


def test_the_check_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The parser itself: a function-level upward import, a `from .. import` of a package and an absolute import
    are all found (so the test above cannot pass by seeing nothing)."""
    pkg = tmp_path / "qlorakit"
    (pkg / "quant").mkdir(parents=True)
    (pkg / "quant" / "x.py").write_text("def f():\n    from ..train.run import run\n"
                                        "from .. import kernels\nimport qlorakit.cli\nfrom . import y\n")
    monkeypatch.setattr(__import__(__name__), "SRC", pkg)
    found = _violations()
    assert any("quant imports train.run" in v for v in found)
    assert any("quant imports cli" in v for v in found)
    assert any("quant imports kernels" in v for v in found)
    assert not any(" y" in v for v in found)  # same unit
    assert len(_imports(pkg / "quant" / "x.py")) == 4


def test_the_layer_table_in_docs_lists_the_same_order():
    text = (SRC.parents[1] / "docs" / "design.md").read_text(encoding="utf-8")
    rows = [line.split("|")[1].strip().strip("`").removesuffix("/").removesuffix(".py")
            for line in text.splitlines() if line.startswith("| `")]
    listed = [r for r in rows if r in LAYERS]
    assert listed == LAYERS, listed
