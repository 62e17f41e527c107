"""The command-line scripts are thin shells over importable modules: none imports another (the options they share
live in training/cli_options.py), except quickstart.py, which runs the others and checks its presets with their
parsers."""

from __future__ import annotations

import ast
import os

from conftest import REPO_ROOT

SCRIPTS = sorted(name[:-3] for name in os.listdir(REPO_ROOT) if name.endswith(".py"))


def imported_modules(path: str) -> set[str]:
    """The top-level names of every module a file imports, at any depth of its code."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_script_imports_another():
    assert {"train", "generate", "fid", "dataset_tool", "ema_sweep", "reconstruct_phema", "plot_run"} <= set(SCRIPTS)
    for script in SCRIPTS:
        if script == "quickstart":
            continue
        others = imported_modules(os.path.join(REPO_ROOT, f"{script}.py")) & (set(SCRIPTS) - {script})
        assert not others, f"{script}.py imports {sorted(others)}"


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("def f():\n    import generate\n    from fid import calc\n")
    assert imported_modules(str(path)) == {"generate", "fid"}
