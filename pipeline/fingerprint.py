"""A stage's code identity: the code its entry points run, by meaning.

An entry point is a qualified name, `module:name` (`pipeline.convert:write_shard`, or a method,
`tasks.stages:Convert.produce`). From each one the walker follows what the code names: the
functions, classes (whole, methods included) and constants defined at module level in the same
module, names imported from a `pipeline` module, and attributes `x.y` of an imported `pipeline`
module, recursively. Each part it reaches is hashed as its syntax tree without positions,
docstrings (or any other bare string statement), or the type annotations of functions, so that
comments, docstrings and formatting do not count. A module's code run at import (anything at
module level but definitions, imports, plain assignments and an `if __name__ == "__main__":`
block) counts wherever the module, or one that imports it at module level, is entered. Names
bound outside the pipeline (`import numpy as np`) count by what they bind.

Where the source does not say what runs, more counts rather than less: `globals()`, `vars()`,
`eval`, `exec`, `sys.modules` or a star import count the whole module (or the star-imported one),
`getattr` with a computed name on a pipeline module counts that whole module, and an import of a
computed module name counts every module of the package.

A module that cannot change a result says so in itself, at module level: `AFFECTS_RESULTS = False`,
with a comment saying why. The walker does not enter it, and a reference into it counts nothing.
A module without that line counts: a new module is counted unless it says otherwise.

Everything is read with `ast` from the sources, nothing is imported (TensorFlow is not), and
each module and entry point is read once per process: a no-op rerun asks for every stage's
identity.
"""
from __future__ import annotations

import ast
import builtins
import functools
import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from pipeline.errors import ConfigError

# Which versions a change makes is decided here; what a stage computes is not.
AFFECTS_RESULTS = False

PACKAGES = ("pipeline",)
# The part names of a module's code run at import and of its `if __name__ == "__main__":` block.
IMPORT_TIME = "<import>"
MAIN = "__main__"
HASH_LENGTH = 16
_EXEMPTION = "AFFECTS_RESULTS"
_BUILTINS = frozenset(dir(builtins))
# Calls that reach names the source does not spell out.
_WHOLE_MODULE_CALLS = {"builtins.globals", "builtins.eval", "builtins.exec"}
_ATTRIBUTE_CALLS = {"builtins.getattr", "builtins.hasattr", "builtins.setattr", "builtins.delattr"}
_IMPORT_CALLS = {"builtins.__import__", "importlib.import_module", "importlib.__import__", "importlib.reload"}

# A target of a reference: ("part", module, name), ("whole", module), ("enter", module) (imported:
# its code run at import counts) or ("all", package).
Target = tuple


def _strip(tree: ast.AST) -> ast.AST:
    """`tree`, in place, without what cannot change what it computes: bare string statements
    (docstrings among them) and the type annotations of functions."""
    for node in ast.walk(tree):
        for name in ("body", "orelse", "finalbody"):
            statements = getattr(node, name, None)
            if isinstance(statements, list):
                setattr(node, name, [statement for statement in statements if not _is_bare_string(statement)])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
        elif isinstance(node, ast.arg):
            node.annotation = None
    return tree


def _is_bare_string(statement: ast.AST) -> bool:
    return (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
            and isinstance(statement.value.value, str))


def _dump(nodes: Iterable[ast.AST]) -> str:
    return "\n".join(ast.dump(node, annotate_fields=False, include_attributes=False) for node in nodes)


def normalised_source(data: bytes) -> bytes:
    """What of a Python file's source counts (see `_strip`), or `data` itself where it does not
    parse as Python: a model file's identity, which a comment does not change."""
    try:
        tree = ast.parse(data)
    except (SyntaxError, ValueError):  # ValueError: a null byte
        return data
    return _dump([_strip(tree)]).encode()


def _followed(module: str, packages: Sequence[str]) -> bool:
    return any(module == package or module.startswith(f"{package}.") for package in packages)


@functools.lru_cache(maxsize=None)
def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a parent that is no package
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _is_submodule(package: str, name: str) -> bool:
    # Only a package is searched: find_spec would import any other module to look into it.
    module = _module(package)
    return module is not None and module.is_package and _module_file(f"{package}.{name}") is not None


def _is_main_block(statement: ast.stmt) -> bool:
    test = statement.test if isinstance(statement, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and len(test.comparators) == 1 and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == "__main__")


def _is_exemption(statement: ast.stmt) -> bool:
    return (isinstance(statement, ast.Assign) and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name) and statement.targets[0].id == _EXEMPTION
            and isinstance(statement.value, ast.Constant) and statement.value.value is False)


def _bound_names(target: ast.AST) -> list[str] | None:
    """The names a plain assignment target binds, or None for another target (`x[0] = `, `x.y = `)."""
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        names = [_bound_names(element) for element in target.elts]
        return None if None in names else [name for found in names for name in found]
    return None


def _import_bindings(statement: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> dict[str, str]:
    """Local name -> what it binds: "a.b" (a module) or "a.b:c" (a name in one)."""
    if isinstance(statement, ast.Import):
        return {alias.asname or alias.name.split(".")[0]: alias.name if alias.asname else alias.name.split(".")[0]
                for alias in statement.names}
    base = _source_module(statement, module, is_package)
    return {alias.asname or alias.name: f"{base}:{alias.name}" for alias in statement.names if alias.name != "*"}


def _source_module(statement: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a `from ... import` in `module` imports from, a relative one resolved."""
    if not statement.level:
        return statement.module or ""
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(statement.level - 1):
        package = package.rpartition(".")[0]
    return ".".join(filter(None, (package, statement.module)))


@dataclass
class _Module:
    name: str
    is_package: bool
    exempt: bool
    # Each top-level name to the statements that bind it (def, class, plain assignment).
    parts: dict[str, list[ast.stmt]] = field(default_factory=dict)
    # Each module-level import's local name to what it binds (see `_import_bindings`).
    imports: dict[str, str] = field(default_factory=dict)
    on_import: list[ast.stmt] = field(default_factory=list)
    on_import_names: set[str] = field(default_factory=set)
    main: list[ast.stmt] = field(default_factory=list)
    stars: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=None)
def _module(name: str) -> _Module | None:
    path = _module_file(name)
    if path is None:
        return None
    tree = _strip(ast.parse(path.read_bytes(), filename=str(path)))
    module = _Module(name, path.name == "__init__.py", any(map(_is_exemption, tree.body)))
    for statement in tree.body:
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            module.imports.update(_import_bindings(statement, name, module.is_package))
            if isinstance(statement, ast.ImportFrom) and any(alias.name == "*" for alias in statement.names):
                module.stars.append(_source_module(statement, name, module.is_package))
        elif isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            module.parts.setdefault(statement.name, []).append(statement)
        elif _is_plain_assignment(statement):
            for target in _targets(statement):
                for bound in _bound_names(target):
                    module.parts.setdefault(bound, []).append(statement)
        elif _is_main_block(statement):
            module.main.append(statement)
        else:
            module.on_import.append(statement)
            module.on_import_names.update(node.id for node in ast.walk(statement)
                                          if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store))
    return module


def _targets(statement: ast.Assign | ast.AnnAssign) -> list[ast.AST]:
    return statement.targets if isinstance(statement, ast.Assign) else [statement.target]


def _is_plain_assignment(statement: ast.stmt) -> bool:
    """`NAME = value` or `a, b = value` (annotated or not): a constant, hashed where it is used."""
    return (isinstance(statement, ast.Assign) or isinstance(statement, ast.AnnAssign) and statement.value is not None) \
        and all(_bound_names(target) is not None for target in _targets(statement))


def _resolve_binding(binding: str, packages: Sequence[str]) -> Target | None:
    """What an import binds: ("module", name), a part, or ("outside", dotted name)."""
    module, _, name = binding.partition(":")
    if not _followed(module, packages):
        return ("outside", f"{module}.{name}" if name else module)
    return _attribute(("module", module), name, packages) if name else ("module", module)


def _attribute(owner: Target | None, name: str, packages: Sequence[str]) -> Target | None:
    """What `owner.name` is. An attribute of a part (a class's method) is that part: it counts whole."""
    if owner is None:
        return None
    if owner[0] == "outside":
        return ("outside", f"{owner[1]}.{name}")
    if owner[0] != "module":
        return owner
    module = _module(owner[1])
    if module is None or module.exempt:
        return None
    defined = name in module.parts or name in module.imports or name in module.on_import_names
    if not defined and _is_submodule(owner[1], name):
        return ("module", f"{owner[1]}.{name}")
    # A name the module does not define at module level: the source does not say where it comes from.
    return _resolve_in(module, name, packages) or ("whole", owner[1])


def _resolve_in(module: _Module, name: str, packages: Sequence[str]) -> Target | None:
    """What `name` is at module level in `module`; None for a name it does not bind (a local)."""
    if name in module.imports:
        return _resolve_binding(module.imports[name], packages)
    if module.exempt:
        return None
    if _followed(module.name, packages):
        if name in module.parts:
            return ("part", module.name, name)
        if name in module.on_import_names:
            return ("part", module.name, IMPORT_TIME)
    return ("outside", f"builtins.{name}") if name in _BUILTINS else None


class _References(ast.NodeVisitor):
    """What a part names: the targets to follow, and the names bound outside the packages that
    it uses, as `name=what it binds`."""

    def __init__(self, module: _Module, packages: Sequence[str]):
        self.module, self.packages = module, packages
        self.local: dict[str, str] = {}  # the imports inside the part
        self.targets: set[Target] = set()
        self.outside: set[str] = set()

    def scan(self, statements: Sequence[ast.stmt]) -> None:
        for node in (node for statement in statements for node in ast.walk(statement)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if isinstance(node, ast.ImportFrom) and any(alias.name == "*" for alias in node.names):
                    self._whole(_source_module(node, self.module.name, self.module.is_package))
                bindings = _import_bindings(node, self.module.name, self.module.is_package)
                self.local.update(bindings)
                self.targets.update(_entering(bindings.values(), self.packages))
        for statement in statements:
            self.visit(statement)

    def resolve(self, name: str) -> Target | None:
        binding = self.local.get(name)
        return _resolve_binding(binding, self.packages) if binding else _resolve_in(self.module, name, self.packages)

    def reference(self, node: ast.expr) -> Target | None:
        """What a name or a chain of attributes of one refers to; None for anything else."""
        chain = []
        while isinstance(node, ast.Attribute):
            chain.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        found = self.resolve(node.id)
        if found is not None and found[0] == "outside" and (node.id in self.local or node.id in self.module.imports):
            self.outside.add(f"{node.id}={found[1]}")
        for name in reversed(chain):
            if found is None or found[0] not in ("module", "outside"):
                break
            found = _attribute(found, name, self.packages)
        return found

    def visit_Name(self, node: ast.Name) -> None:
        self._use(self.reference(node))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        head = node.value
        while isinstance(head, ast.Attribute):
            head = head.value
        if not isinstance(head, ast.Name):  # `make().x.y`: what counts is in `make()`
            self.visit(head)
            return
        found = self.reference(node)
        if found == ("outside", "sys.modules"):
            self._whole(self.module.name)
        else:
            self._use(found)

    def visit_Call(self, node: ast.Call) -> None:
        called = self.reference(node.func)
        called = called[1] if called is not None and called[0] == "outside" else None
        if called in _WHOLE_MODULE_CALLS or (called == "builtins.vars" and not node.args):
            self._whole(self.module.name)
        elif called in _ATTRIBUTE_CALLS and len(node.args) >= 2:
            owner, name = self.reference(node.args[0]), node.args[1]
            if owner is not None and owner[0] == "module":
                computed = not (isinstance(name, ast.Constant) and isinstance(name.value, str))
                self._use(("whole", owner[1]) if computed else _attribute(owner, name.value, self.packages))
        elif called in _IMPORT_CALLS and node.args:
            name = node.args[0]
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                self.targets.update(("all", package) for package in self.packages)
            elif _followed(name.value, self.packages):
                self._whole(name.value)
        self.generic_visit(node)

    def _use(self, found: Target | None) -> None:
        if found is None or found[0] == "outside":
            return
        self.targets.add(("whole", found[1]) if found[0] == "module" else found)

    def _whole(self, module: str) -> None:
        if _followed(module, self.packages):
            self.targets.add(("whole", module))


def _entering(bindings: Iterable[str], packages: Sequence[str]) -> Iterator[Target]:
    """The modules that imports binding `bindings` import (`from pipeline import convert` imports
    pipeline and pipeline.convert)."""
    for binding in bindings:
        module, _, name = binding.partition(":")
        if _followed(module, packages):
            yield ("enter", module)
            if name and _is_submodule(module, name):
                yield ("enter", f"{module}.{name}")


def _statements(module: _Module, qualified: str) -> list[ast.stmt]:
    """The statements of part `qualified` of `module`: a top-level name or `Class.method`."""
    if qualified == IMPORT_TIME:
        return module.on_import
    if qualified == MAIN:
        return module.main
    head, *rest = qualified.split(".")
    statements = module.parts.get(head, [])
    for name in rest:
        statements = [inner for outer in statements if isinstance(outer, ast.ClassDef) for inner in outer.body
                      if getattr(inner, "name", None) == name]
    if not statements:
        raise ConfigError(f"no {qualified!r} in {module.name}; expected a function, class, method or "
                          "constant defined at its module level")
    return statements


@functools.lru_cache(maxsize=None)
def _part(module_name: str, qualified: str, packages: tuple[str, ...]) -> tuple[str, frozenset]:
    """The hash of one part and what it refers to."""
    module = _module(module_name)
    statements = _statements(module, qualified)
    found = _References(module, packages)
    found.scan(statements)
    digest = hashlib.sha256("\n".join([_dump(statements), *sorted(found.outside)]).encode()).hexdigest()
    # Running the part runs its module's import-time code, and what a star import brings may be anything.
    targets = {*found.targets, ("enter", module_name), *(("whole", star) for star in module.stars)}
    return digest[:HASH_LENGTH], frozenset(targets)


def _entered(module_name: str, packages: tuple[str, ...]) -> list[Target]:
    """What importing a module runs: its import-time code, and the imports of its module level
    (its packages' among them)."""
    module = _module(module_name)
    if module is None or module.exempt or not _followed(module_name, packages):
        return []
    parent = module_name.rpartition(".")[0]
    return [*([("part", module_name, IMPORT_TIME)] if module.on_import else []),
            *([("enter", parent)] if parent else []), *_entering(module.imports.values(), packages)]


def _whole(module_name: str) -> list[Target]:
    module = _module(module_name)
    if module is None or module.exempt:
        return []
    return [("part", module_name, name) for name in [*module.parts, *[IMPORT_TIME] * bool(module.on_import)]] + \
        [("enter", module_name)]


def _modules_of(package: str) -> list[str]:
    path = _module_file(package)
    if path is None or path.name != "__init__.py":
        return [package]
    return [".".join((package, *file.relative_to(path.parent).with_suffix("").parts)).removesuffix(".__init__")
            for file in sorted(path.parent.rglob("*.py"))]


def _entry(text: str) -> Target:
    module, separator, name = text.partition(":")
    if not separator or not module or not name:
        raise ConfigError(f"entry point {text!r}; expected 'module:name', e.g. 'pipeline.convert:write_shard'")
    if _module(module) is None:
        raise ConfigError(f"entry point {text!r}: no Python module {module!r}")
    return ("part", module, name)


@functools.lru_cache(maxsize=None)
def _identity(entry_points: tuple[str, ...], packages: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    counted: dict[str, str] = {}
    seen: set[Target] = set()
    pending = [_entry(text) for text in entry_points]
    while pending:
        target = pending.pop()
        if target in seen:
            continue
        seen.add(target)
        kind, module = target[:2]
        if kind == "part" and not _module(module).exempt:
            counted[f"{module}:{target[2]}"], found = _part(module, target[2], packages)
            pending.extend(found)
        elif kind == "enter":
            pending.extend(_entered(module, packages))
        elif kind == "whole":
            pending.extend(_whole(module))
        elif kind == "all":
            pending.extend(("whole", name) for name in _modules_of(module))
    return tuple(sorted(counted.items()))


def code_identity(entry_points: Iterable[str], packages: Sequence[str] = PACKAGES) -> dict[str, str]:
    """{`module:name`: short hash} of every part of `packages` that the `entry_points` run (see
    the module's docstring), and of the entry points themselves. Read once per process."""
    return dict(_identity(tuple(entry_points), tuple(packages)))


def forget() -> None:
    """Read the sources again at the next call (they changed under this process)."""
    for cached in (_module_file, _module, _part, _identity):
        cached.cache_clear()
    importlib.invalidate_caches()  # the import system's listings of folders, where a new module may be
