"""The layout is the architecture: which subpackage may import which.

``ir`` imports nothing else of qkvflow; ``tracing`` builds graphs and knows
no pass or view; passes and views read the graph (the IR), not the code
that built it; the executor dispatches through the registry. Imports are
read from the source, lazy ones inside functions included.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__import__("qkvflow").__file__).parent
# subpackage -> what its modules may import from qkvflow ("" is the package root:
# __version__, atomic file writing).
ALLOWED = {
    "ir": {"ir"},
    "tracing": {"ir", "tracing", "run"},  # run: the kernels of an eager run
    "passes": {"ir", "passes", ""},
    "views": {"ir", "passes", "views", ""},
    "run": {"ir", "run", ""},
    "models": {"ir", "tracing", "models"},
}


def _imports(path: Path) -> set[str]:
    """The qkvflow subpackages (first part after qkvflow) a module imports."""
    sub = path.parent.name
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = ([sub] if node.level == 1 else []) + (node.module.split(".") if node.module else [])
            top = parts[0] if parts else ""
            found.add("" if (PACKAGE / f"{top}.py").is_file() else top)  # a root module: atomic
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qkvflow"):
            found.add((node.module.split(".") + [""])[1])
    return found


@pytest.mark.parametrize("sub", ALLOWED)
def test_each_subpackage_imports_only_what_it_may(sub):
    for path in sorted((PACKAGE / sub).glob("*.py")):
        extra = _imports(path) - ALLOWED[sub]
        assert not extra, f"{sub}/{path.name} imports {sorted(extra)}"


def _local_imports(name: str) -> set[str]:
    """Modules of tracing/ that tracing/<name>.py imports."""
    tree = ast.parse((PACKAGE / "tracing" / f"{name}.py").read_text())
    found = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.level == 1:
            found |= {n.module} if n.module else {a.name for a in n.names}
    return found


def test_the_tracer_and_the_ops_users_call_do_not_import_each_other():
    assert "tracer" not in _local_imports("nn")
    assert "nn" not in _local_imports("tracer")
    assert _local_imports("tensor") == {"context"}
