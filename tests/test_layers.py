"""The package's layers point one way: no import circles, nothing but the `wuerstchen` command
imports the command modules, and importing the library pulls in neither the CLI nor the test- and
server-only dependencies.

    pytest tests/test_layers.py
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "wuerstchen"


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its code (functions too), except under
    `if TYPE_CHECKING:` (annotations only, never executed)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            node.body = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = module_names()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles() -> None:
    g = graph()
    assert len(g) > 40 and "wuerstchen.io.folders" in g["wuerstchen.pipeline"]  # the walk sees imports
    assert cycles(g) == []


def test_a_circle_is_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_cli_imports_the_commands() -> None:
    offenders = {
        name: sorted(d for d in deps if d.startswith("wuerstchen.commands"))
        for name, deps in graph().items()
        if not name.startswith(("wuerstchen.commands", "wuerstchen.cli"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_the_library_is_lean() -> None:
    code = (
        "import sys, wuerstchen; from wuerstchen import WuerstchenPipeline, shipped_model; "
        "print(' '.join(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    assert "wuerstchen.pipeline" in loaded  # the import happened
    # (argparse itself is loaded by torch; the argparse-based command modules must not be.)
    for heavy in ("diffusers", "fastapi", "uvicorn", "wuerstchen.cli", "wuerstchen.commands", "peft"):
        assert heavy not in loaded, heavy


def test_the_pipeline_class_stays_short():
    """The pipeline composes the parts; what differs between generations lives in `parts.py`."""
    import ast
    from pathlib import Path

    import wuerstchen

    tree = ast.parse((Path(wuerstchen.__file__).parent / "pipeline.py").read_text(encoding="utf-8"))
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "WuerstchenPipeline"]
    assert cls.end_lineno - cls.lineno + 1 < 300
