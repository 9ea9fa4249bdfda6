"""The layers the folders show: a lower layer never imports a higher one, and no module grows past
the size where it stops saying what it holds. Read from the source with ast, no import needed."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lxdimagefs"
# Lowest first. The modules at the package's top are the base every layer may use.
LAYERS = ["base", "wire", "servers", "data", "upload", "fs", "tree", "contents", "compose", "mount"]
MAX_MODULES, MAX_LINES, MAX_CLASS_LINES = 10, 300, 200


def layer_of(module: str) -> str:
    """`lxdimagefs.data.fetch` -> `data`; `lxdimagefs.errors` -> `base`; `python -m` is the top."""
    if module == "lxdimagefs.__main__":
        return LAYERS[-1]
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in LAYERS else "base"


def imports_of(module: str, source: str) -> list[tuple[int, str]]:
    """What `module` (dotted name) imports of the package, with line numbers."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, n) for line, n in found if n.startswith("lxdimagefs.")]


def violations(module: str, source: str) -> list[str]:
    here = layer_of(module)
    return [f"{module}:{line} ({here}) imports {target}" for line, target in imports_of(module, source)
            if target != "lxdimagefs.__version__" and LAYERS.index(layer_of(target)) > LAYERS.index(here)]


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def name_of(path: Path) -> str:
    return "lxdimagefs." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def test_no_layer_imports_a_higher_one() -> None:
    wrong = [v for path in modules() for v in violations(name_of(path), path.read_text())]
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_sees_a_violation() -> None:
    """The check can fail: a server module importing the tree, relatively or not, is caught."""
    source = ("from lxdimagefs.compose.root import Tree\nfrom ..fs import node\nfrom .lxd import LXDClient\n"
              "from lxdimagefs import tree\n")
    found = violations("lxdimagefs.servers.catalog", source)
    assert [v.split(" imports ")[1] for v in found] == ["lxdimagefs.compose.root.Tree", "lxdimagefs.fs.node",
                                                        "lxdimagefs.tree"]


def test_sizes_stay_readable() -> None:
    too_big = []
    for package in [PACKAGE, *(p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())]:
        count = len([p for p in package.glob("*.py") if p.name != "__init__.py"])
        if count > MAX_MODULES:
            too_big.append(f"{package.name}/ holds {count} modules")
    for path in modules():
        text = path.read_text()
        if len(text.splitlines()) > MAX_LINES:
            too_big.append(f"{path.relative_to(PACKAGE)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_CLASS_LINES:
                    too_big.append(f"{path.relative_to(PACKAGE)}: class {node.name} {length} lines")
    assert not too_big, "\n".join(too_big)
