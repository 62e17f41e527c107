"""The install files agree: conda's environment.yml names every package that pip's requirements files name (the
suite needs them all: pytest.ini's -n is pytest-xdist's, and the extras' features are tested), with the same lower
bounds."""

from __future__ import annotations

import os
import re

from conftest import REPO_ROOT

CONDA_NAMES = {"torch": "pytorch"}  # pip name -> conda-forge name, where they differ.


def _requirements(path: str) -> dict[str, str]:
    """name -> version specifier of each requirement line (comments and blank lines skipped)."""
    found = {}
    with open(os.path.join(REPO_ROOT, path)) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, spec = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", line).groups()
                found[name.lower()] = spec.replace(" ", "")
    return found


def _conda_dependencies() -> dict[str, str]:
    """name -> version specifier of environment.yml's conda dependencies (a plain list; no YAML library needed)."""
    found, inside = {}, False
    with open(os.path.join(REPO_ROOT, "environment.yml")) as f:
        for line in f:
            if re.match(r"^dependencies:\s*$", line):
                inside = True
            elif inside and re.match(r"^\S", line):
                break
            elif inside and (item := re.match(r"^\s+-\s+([A-Za-z0-9_.-]+)\s*([^#]*)", line)):
                found[item[1].lower()] = item[2].strip().replace(" ", "")
    return found


def test_environment_yml_names_every_requirement_with_its_lower_bound():
    conda = _conda_dependencies()
    assert {"python", "pip"} <= conda.keys()
    for path in ("requirements.txt", "requirements-extras.txt"):
        for name, spec in _requirements(path).items():
            conda_name = CONDA_NAMES.get(name, name)
            assert conda_name in conda, f"environment.yml lacks {conda_name} ({path} names {name})"
            assert conda[conda_name] == spec, f"environment.yml: {conda_name}{conda[conda_name]}, {path}: {spec}"


def test_the_parsers_read_what_the_files_say():
    """Pinned to entries written out by hand, so that a parser that read nothing cannot pass the test above."""
    assert _requirements("requirements.txt")["pytest-xdist"] == ">=3.5"
    assert _requirements("requirements-extras.txt") == {"diffusers": ">=0.27", "timm": ">=1.0"}
    conda = _conda_dependencies()
    assert conda["pytorch"] == ">=2.4" and conda["python"] == ">=3.10" and len(conda) >= 17
