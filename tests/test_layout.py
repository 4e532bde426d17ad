"""The package layout's rule that import-linter cannot state: mathtune modules import each other at
the top of the file, where lint-imports and a reader see them. An import inside a function is kept
only where it defers something slow or optional, and says so in a comment on its line."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

DEFERRED = {
    ("mathtune/cli.py", "mathtune.train.recipe"),  # torch, transformers, accelerate: seconds to import
    ("mathtune/cli.py", "mathtune.ui.server"),  # FastAPI and uvicorn: the optional `ui` extra
    ("mathtune/ui/runs.py", "mathtune.train.checkpoints"),  # transformers, for runs started elsewhere
    ("mathtune/eval/evaluate.py", "mathtune.eval.kvcache"),  # torch and transformers, only to answer
}


def _in_function_imports(path):
    """(module imported) for each `import mathtune...`/`from mathtune... import` inside a function,
    outside `if TYPE_CHECKING:` blocks, with the source line."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = path.read_text(encoding="utf-8").splitlines()
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mathtune"):
                yield node.module, lines[node.lineno - 1]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("mathtune"):
                        yield alias.name, lines[node.lineno - 1]


def test_mathtune_modules_import_each_other_at_the_top_unless_a_deferral_says_why():
    found = {}
    for path in sorted((ROOT / "mathtune").rglob("*.py")):
        for module, line in _in_function_imports(path):
            found[(path.relative_to(ROOT).as_posix(), module)] = line
    assert set(found) == DEFERRED, sorted(set(found) ^ DEFERRED)
    assert all("#" in line for line in found.values())
