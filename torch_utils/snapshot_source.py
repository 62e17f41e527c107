"""The module text a snapshot embeds for its objects: one self-contained source that the official EDM loader
can execute.

The official loader (its ``torch_utils.persistence``) runs each object's ``module_src`` as a brand-new module
that belongs to no package, with the official ``torch_utils`` and ``dnnlib`` on ``sys.path``, takes the class
by name from it and restores the pickled ``__dict__``. It caches modules by their text, so objects that carry
the same text share one module (and ``isinstance`` between them works). Our classes live in several files
that import each other, which such a module cannot do. So the classes of a *bundle* of modules all carry one
text: the bundle's sources joined in order, with the imports between them dropped.

The joined text may import only the standard library, numpy, torch, diffusers (for EDM2's VAE encoder), the
``dnnlib`` package and the names the official ``torch_utils.persistence`` / ``torch_utils.misc`` also have;
``joined_source`` checks this, and that no top-level name means two different things in two of the joined modules,
and refuses otherwise.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import sys
from typing import Sequence

# What the official torch_utils offers to code that runs inside its loader.
OFFICIAL_TORCH_UTILS = {"persistence": {"persistent_class", "is_persistent", "import_hook"}, "misc": None}
# diffusers: the official EDM2 environment has it for its latent models, whose encoder loads the VAE with it.
_THIRD_PARTY_ROOTS = {"numpy", "torch", "diffusers"}
# Packages of the official release on the loader's path, importable whole (code uses only what both releases have).
_OFFICIAL_PACKAGES = {"dnnlib"}

_bundles: dict[str, tuple[str, ...]] = {}


def declare_bundle(*module_names: str) -> None:
    """Objects of classes defined in these modules embed their joined source (in this order; a module may
    import only the ones before it)."""
    for name in module_names:
        if name in _bundles and _bundles[name] != module_names:
            raise ValueError(f"module {name} is already in the bundle {_bundles[name]}")
        _bundles[name] = tuple(module_names)


def module_source(module_name: str) -> str:
    """The text that objects of classes defined in ``module_name`` embed as their ``module_src``: the joined
    source of its bundle, or else the module's own source. Cached, so one snapshot stores the text once."""
    bundle = _bundles.get(module_name)
    return joined_source(bundle) if bundle else _own_source(module_name)


@functools.lru_cache(maxsize=None)
def _own_source(module_name: str) -> str:
    return inspect.getsource(sys.modules[module_name])


class _Piece:
    """One module of a bundle: its source lines and what the joined text keeps, drops and defines."""

    def __init__(self, module_name: str):
        self.name = module_name
        self.source = inspect.getsource(importlib.import_module(module_name))
        self.tree = ast.parse(self.source)
        self.lines = self.source.splitlines()
        self.dropped_lines: set[int] = set()
        self.future: set[str] = set()

    def where(self, node: ast.AST) -> str:
        return f"{self.name} line {node.lineno}"

    def drop(self, node: ast.stmt) -> None:
        self.dropped_lines.update(range(node.lineno, node.end_lineno + 1))

    def kept_text(self) -> str:
        return "\n".join(line for number, line in enumerate(self.lines, 1) if number not in self.dropped_lines)


def _imported_module(piece: _Piece, node: ast.ImportFrom) -> str:
    if node.level:
        package = piece.name if piece.name.endswith(".__init__") else piece.name.rpartition(".")[0]
        return importlib.util.resolve_name("." * node.level + (node.module or ""), package)
    return node.module or ""


def _is_allowed_external(module: str, names: Sequence[str] | None) -> bool:
    root, _, rest = module.partition(".")
    if root in _THIRD_PARTY_ROOTS or root in sys.stdlib_module_names:
        return True
    if root in _OFFICIAL_PACKAGES and not rest and names is None:
        return True
    if root != "torch_utils" or names is None:
        return False
    if not rest:
        return all(name in OFFICIAL_TORCH_UTILS for name in names)
    offered = OFFICIAL_TORCH_UTILS.get(rest, set())
    return rest in OFFICIAL_TORCH_UTILS and (offered is None or all(name in offered for name in names))


def _check_imports(piece: _Piece, bundle: Sequence[str], bindings: dict) -> None:
    """Drop the imports of earlier bundle modules; refuse any other import the official loader cannot satisfy.
    Records each top-level name an external import binds in ``bindings``."""
    earlier = bundle[:bundle.index(piece.name)]
    for node in ast.walk(piece.tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        top_level = node in piece.tree.body
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            piece.future.update(alias.name for alias in node.names)
            piece.drop(node)
            continue
        if isinstance(node, ast.ImportFrom):
            module = _imported_module(piece, node)
            names = [alias.name for alias in node.names]
            if module in bundle:
                if module not in earlier or not top_level or any(a.asname not in (None, a.name) for a in node.names):
                    raise ValueError(f"{piece.where(node)}: import of bundle module {module} must be a top-level "
                                     f"'from {module} import name' of a module listed before it")
                piece.drop(node)
                continue
            if not _is_allowed_external(module, names):
                raise ValueError(f"{piece.where(node)}: 'from {module} import ...' is not available in the official "
                                 f"loader (allowed: the standard library, numpy, torch, diffusers, "
                                 f"torch_utils.persistence/misc)")
            for alias in node.names:
                bindings.setdefault(alias.asname or alias.name, set()).add(("from", module, alias.name))
        else:
            for alias in node.names:
                if alias.name in bundle or not _is_allowed_external(alias.name, None):
                    raise ValueError(f"{piece.where(node)}: 'import {alias.name}' is not available in the official "
                                     f"loader (allowed: the standard library, numpy, torch, diffusers, dnnlib)")
                bound = alias.asname or alias.name.split(".")[0]
                bindings.setdefault(bound, set()).add(("import", alias.name if alias.asname else bound))


def _check_persistence_uses(piece: _Piece) -> None:
    allowed = OFFICIAL_TORCH_UTILS["persistence"]
    for node in ast.walk(piece.tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "persistence":
            if node.attr not in allowed:
                raise ValueError(f"{piece.where(node)}: persistence.{node.attr} does not exist in the official "
                                 f"torch_utils.persistence")


def _top_level_definitions(piece: _Piece) -> set[str]:
    names = set()
    for node in piece.tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


@functools.lru_cache(maxsize=None)
def joined_source(bundle: tuple[str, ...]) -> str:
    """The modules' sources joined into one module text that imports none of them (see the module docstring).
    Raises ValueError naming the module and line of anything the official loader could not run."""
    pieces = [_Piece(name) for name in bundle]
    bindings: dict[str, set] = {}
    for piece in pieces:
        _check_imports(piece, bundle, bindings)
        _check_persistence_uses(piece)
        for name in _top_level_definitions(piece):
            bindings.setdefault(name, set()).add(("defined in", piece.name))
    clashes = sorted(name for name, meanings in bindings.items() if len(meanings) > 1)
    if clashes:
        details = "; ".join(f"{name}: {sorted(bindings[name])}" for name in clashes)
        raise ValueError(f"bundle {', '.join(bundle)}: top-level names with two meanings: {details}")
    future = sorted(set().union(*(piece.future for piece in pieces)))
    parts = [f'"""Self-contained source of {", ".join(bundle)}, embedded in snapshots for the official loader."""']
    if future:
        parts.append(f"from __future__ import {', '.join(future)}")
    for piece in pieces:
        parts.append(f"# {'-' * 100}\n# {piece.name}\n\n{piece.kept_text()}")
    text = "\n\n".join(parts) + "\n"
    compile(text, f"<joined source of {bundle[0]}...>", "exec")
    return text
