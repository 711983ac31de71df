"""The library stays readable: no function over 60 lines, no class over 150, no module over 400 (src/ducat)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ducat"


def _sizes() -> list[tuple[str, str, int, int]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        found.append(("module", str(path.relative_to(SRC)), len(text.splitlines()), 400))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append(("function", f"{path.name}:{node.name}", node.end_lineno - node.lineno + 1, 60))
            elif isinstance(node, ast.ClassDef):
                found.append(("class", f"{path.name}:{node.name}", node.end_lineno - node.lineno + 1, 150))
    return found


def test_no_function_class_or_module_over_its_limit():
    sizes = _sizes()
    assert len([s for s in sizes if s[0] == "module"]) > 30  # the walk found the package
    over = [f"{kind} {name}: {lines} lines (limit {limit})" for kind, name, lines, limit in sizes if lines > limit]
    assert not over, "\n".join(over)
