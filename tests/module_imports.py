"""What a source file imports, read from its syntax tree (imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path


def imported_names(path: Path, root: Path) -> set[str]:
    """Absolute dotted names a file under ``root`` imports, relative imports resolved inside its package;
    ``from pkg import name`` yields both ``pkg`` and ``pkg.name`` (which may be a module)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names
