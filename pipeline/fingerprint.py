"""A stage's code identity: the code its entry points run, by meaning.

An entry point is a qualified name, `module:name` (`pipeline.convert:write_shard`, or a method,
`tasks.stages:Convert.produce`). From each one the walker follows what the code names: the
functions, classes (whole, methods included) and constants defined at module level in the same
module, names imported from a followed package (`pipeline`, `tasks`), attributes `x.y` of an
imported module of theirs, and, in a class's code, `self.x`, `cls.x`, `type(self).x` and
`super().x`: the attribute of that class or of its bases (in Python's order), recursively. Each
part it reaches is hashed as its syntax tree without positions, docstrings (or any other bare
string statement), statements that only log or warn (`log.info(...)`, `warnings.warn(...)`; of
those, only the arguments that call something count),
the words of a raised exception's message (its type and what it interpolates count), or the
type annotations of functions, so that comments, docstrings, formatting, log lines and messages
do not count. A module's code run at import (anything at module level but definitions, imports,
plain assignments and an `if __name__ == "__main__":` block; imports and definitions under a
module-level `if` or `try` are followed too) counts wherever the module, or one that imports it
at module level, is entered. Names bound outside the followed packages (`import numpy as np`,
`from json import *`) count by what they bind, never by their source.

A task's parameter (`x = luigi.IntParameter(...)`) counts by its value, in the stage's identity,
not by its declaration. Where the source does not say what runs, more counts rather than less:
`globals()`, `vars()`, `eval`, `exec`, `sys.modules` or a star import of a followed module count
the whole module (or the star-imported one), `getattr` with a computed name on a pipeline module
counts that whole module (on `self`, that whole class), an import of a computed module name counts
every module of the package, and a `self.x` that is not found (a base the walker cannot find, a
class decorator, an attribute a method sets) counts the whole class.

A module that cannot change a result says so in itself, at module level: `AFFECTS_RESULTS = False`,
with a comment saying why. The walker does not enter it, and a reference into it counts nothing,
but for a class there, which counts by its bases, names only (an exception's place in the
hierarchy decides what an `except` catches; its message does not). A module without that line
counts: a new module is counted unless it says otherwise.

Everything is read with `ast` from the sources, nothing is imported (TensorFlow is not), and
each module and entry point is read once per process: a no-op rerun asks for every stage's
identity.
"""
from __future__ import annotations

import ast
import builtins
import copy
import functools
import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from pipeline.errors import ConfigError

# Which versions a change makes is decided here; what a stage computes is not.
AFFECTS_RESULTS = False

PACKAGES = ("pipeline", "tasks")
# The part names of a module's code run at import and of its `if __name__ == "__main__":` block.
IMPORT_TIME = "<import>"
MAIN = "__main__"
HASH_LENGTH = 16
_EXEMPTION = "AFFECTS_RESULTS"
_BUILTINS = frozenset(dir(builtins))
# Calls that reach names the source does not spell out.
_WHOLE_MODULE_CALLS = {"builtins.globals", "builtins.eval", "builtins.exec"}
_ATTRIBUTE_CALLS = {"builtins.getattr", "builtins.hasattr", "builtins.setattr", "builtins.delattr"}
# The names a module's logger goes by, and what a logger says through.
_LOGGERS = frozenset({"log", "logger", "_log", "_logger", "LOG", "LOGGER", "logging"})
_LOG_METHODS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "log"})
# The names a method's instance or class goes by.
_SELF = frozenset({"self", "cls"})
_IMPORT_CALLS = {"builtins.__import__", "importlib.import_module", "importlib.__import__", "importlib.reload"}

# A target of a reference: ("part", module, name), ("whole", module), ("enter", module) (imported:
# its code run at import counts) or ("all", package).
Target = tuple


def _strip(tree: ast.AST) -> ast.AST:
    """`tree`, in place, without what cannot change what it computes: bare string statements
    (docstrings among them), statements that only log or warn, the type annotations of functions,
    and the wording of a raised exception's message (its type and what it interpolates stay)."""
    for node in ast.walk(tree):
        for name in ("body", "orelse", "finalbody"):
            statements = getattr(node, name, None)
            if isinstance(statements, list):
                kept = (_unlogged(statement) for statement in statements if not _is_bare_string(statement))
                setattr(node, name, [statement for statement in kept if statement is not None])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
        elif isinstance(node, ast.arg):
            node.annotation = None
        elif isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            _unword(node.exc)
    return tree


def _unword(call: ast.Call) -> None:
    """The exception built by `call`, in place, without the words of its message, its first
    argument: every string constant in it, the literal parts of an f-string among them, becomes
    empty. Other arguments (a shard's path, which a handler acts on) count whole."""
    for node in ast.walk(call.args[0]) if call.args else ():
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            node.value = ""


# Expressions that may act, not only say.
_ACTING = (ast.Call, ast.NamedExpr, ast.Yield, ast.YieldFrom, ast.Await)


def _unlogged(statement: ast.AST) -> ast.AST | None:
    """`statement`, or what of it counts where it only logs or warns (`log.info(...)`,
    `logger.warning(...)`, `logging.debug(...)`, `warnings.warn(...)`): what it says is read by
    people, never by the pipeline, but an argument that calls something may act, and counts."""
    call = statement.value if isinstance(statement, ast.Expr) else None
    func = call.func if isinstance(call, ast.Call) else None
    if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            and ((func.value.id in _LOGGERS and func.attr in _LOG_METHODS)
                 or (func.value.id, func.attr) == ("warnings", "warn"))):
        return statement
    acting = [argument for argument in [*call.args, *(keyword.value for keyword in call.keywords)]
              if any(isinstance(node, _ACTING) for node in ast.walk(argument))]
    return ast.Expr(ast.Tuple(acting, ast.Load())) if acting else None


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
    # Stripped (see `_strip`) part by part, as each is hashed: most of a module is never reached.
    tree = ast.parse(path.read_bytes(), filename=str(path))
    module = _Module(name, path.name == "__init__.py", any(map(_is_exemption, tree.body)))
    for statement in tree.body:
        if _is_bare_string(statement) or (statement := _unlogged(statement)) is None:
            continue
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            _record_import(module, statement)
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
            # `if`/`try` at module level: the imports and definitions in it bind module-level names too.
            for inner in _nested_statements(statement):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    _record_import(module, inner)
                elif isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    module.on_import_names.add(inner.name)
    return module


def _record_import(module: _Module, statement: ast.Import | ast.ImportFrom) -> None:
    module.imports.update(_import_bindings(statement, module.name, module.is_package))
    if isinstance(statement, ast.ImportFrom) and any(alias.name == "*" for alias in statement.names):
        module.stars.append(_source_module(statement, module.name, module.is_package))


def _nested_statements(node: ast.AST) -> Iterator[ast.stmt]:
    """The statements within `node`, at any depth, but not inside a function or class it defines."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.stmt):
            yield child
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.expr)):
            yield from _nested_statements(child)


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
    if module is None:
        return None
    # `from package import submodule` in the package's own __init__ binds the submodule.
    defined = name in module.parts or name in module.on_import_names or \
        module.imports.get(name, f"{owner[1]}:{name}") != f"{owner[1]}:{name}"
    if not defined and _is_submodule(owner[1], name):
        return ("module", f"{owner[1]}.{name}")
    if module.exempt:
        return _resolve_in(module, name, packages)
    # A name the module does not define at module level: the source does not say where it comes from.
    return _resolve_in(module, name, packages) or ("whole", owner[1])


def _resolve_in(module: _Module, name: str, packages: Sequence[str]) -> Target | None:
    """What `name` is at module level in `module`; None for a name it does not bind (a local)."""
    if name in module.imports:
        return _resolve_binding(module.imports[name], packages)
    if module.exempt:
        # A class there still decides control flow (`except UnusableImage:`): it counts by its bases.
        return ("bases", module.name, name) if _class_def((module.name, name)) is not None else None
    if _followed(module.name, packages):
        if name in module.parts:
            return ("part", module.name, name)
        if name in module.on_import_names:
            return ("part", module.name, IMPORT_TIME)
    if name in _BUILTINS:
        return ("outside", f"builtins.{name}")
    # Bound by a star import from outside the packages, if by anything: it counts by what it binds.
    outside_stars = [star for star in module.stars if not _followed(star, packages)]
    return ("outside", f"{'|'.join(outside_stars)}:*.{name}") if outside_stars else None


# A class, as (module, qualified name in it).
Class = tuple


def _class_def(cls: Class) -> ast.ClassDef | None:
    module = _module(cls[0])
    head, *rest = cls[1].split(".")
    statements = module.parts.get(head, []) if module is not None else []
    for name in rest:
        statements = [inner for outer in statements if isinstance(outer, ast.ClassDef) for inner in outer.body
                      if getattr(inner, "name", None) == name]
    return statements[-1] if statements and isinstance(statements[-1], ast.ClassDef) else None


@functools.lru_cache(maxsize=None)
def _members(cls: Class) -> tuple[dict[str, list[ast.stmt]], frozenset[str]]:
    """The statements of a class's body binding each name, and the names its methods assign to `self.`."""
    members: dict[str, list[ast.stmt]] = {}
    for statement in _class_def(cls).body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            members.setdefault(statement.name, []).append(statement)
        elif isinstance(statement, (ast.Assign, ast.AnnAssign)):
            for target in _targets(statement):
                for bound in _bound_names(target) or []:
                    members.setdefault(bound, []).append(statement)
    assigned = frozenset(node.attr for node in ast.walk(_class_def(cls)) if isinstance(node, ast.Attribute)
                         and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name)
                         and node.value.id in _SELF)
    return members, assigned


@functools.lru_cache(maxsize=None)
def _bases(cls: Class, packages: tuple[str, ...]) -> tuple[Class, ...] | None:
    """The bases of `cls` that the walker follows (one in an exempt module, or outside the packages,
    contributes nothing); None where the source does not say what its attributes are (a base that
    is no class it can find, a metaclass)."""
    node = _class_def(cls)
    if node is None or node.keywords:
        return None
    references = _References(_module(cls[0]), packages)
    followed = []
    for base in node.bases:
        found = references.reference(base.value if isinstance(base, ast.Subscript) else base)
        if found is not None and found[0] == "part" and _class_def(found[1:]) is not None:
            followed.append(found[1:])
        elif found is None or found[0] not in ("bases", "outside"):
            return None
    return tuple(followed)


@functools.lru_cache(maxsize=None)
def _mro(cls: Class, packages: tuple[str, ...]) -> tuple[Class, ...] | None:
    """The followed classes of `cls`'s method resolution order (C3), or None where a base is unknown."""
    bases = _bases(cls, packages)
    if bases is None:
        return None
    orders = [_mro(base, packages) for base in bases]
    if None in orders:
        return None
    pending = [list(order) for order in [*orders, bases] if order]
    merged = [cls]
    while pending:
        head = next((order[0] for order in pending if not any(order[0] in other[1:] for other in pending)), None)
        if head is None:  # no consistent order: Python refuses such a class
            return None
        merged.append(head)
        pending = [rest for rest in ([item for item in order if item != head] for order in pending) if rest]
    return tuple(merged)


def _is_parameter(module: _Module, statement: ast.stmt, packages: Sequence[str]) -> bool:
    """A task's parameter declared at class level (`x = luigi.IntParameter(...)`, or a parameter
    class of an exempt module): its value counts in the stage's identity, or is declared unable to
    change the result, so the declaration itself does not count."""
    value = statement.value if isinstance(statement, (ast.Assign, ast.AnnAssign)) else None
    if not isinstance(value, ast.Call):
        return False
    func = value.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    found = _References(module, packages).reference(func) if name.endswith("Parameter") else None
    return found is not None and (found[0] == "bases" or found[0] == "outside" and found[1].startswith("luigi."))


def _self_attribute(context: Class, name: str, packages: tuple[str, ...], after: Class | None = None) -> Target | None:
    """What `self.name` is in a method of `context` (from the class after `after` in its order: `super()`).
    Where the source does not say, the whole class counts."""
    order = _mro(context, packages)
    if order is None or (after is not None and after not in order):
        return ("part", *context)
    for cls in order[order.index(after) + 1 if after else 0:]:
        statements = _members(cls)[0].get(name)
        if statements:
            if all(_is_parameter(_module(cls[0]), statement, packages) for statement in statements):
                return None
            return ("part", context[0], f"{context[1]}.{name}") if after is None else ("part", cls[0], f"{cls[1]}.{name}")
    # Not defined in the followed classes: an attribute of a base outside them (luigi.Task's), unless
    # a decorator may have added it or a method sets it.
    if any(_class_def(cls).decorator_list or name in _members(cls)[1] for cls in order):
        return ("part", *context)
    return None


class _References(ast.NodeVisitor):
    """What a part names: the targets to follow, and the names bound outside the packages that
    it uses, as `name=what it binds`. In a class's code (`context`), `self.x`, `cls.x`,
    `type(self).x` and `super().x` are followed to the class's attribute; `defining` is the
    class whose body holds the code."""

    def __init__(self, module: _Module, packages: Sequence[str], context: Class | None = None,
                 defining: Class | None = None):
        self.module, self.packages = module, tuple(packages)
        self.context, self.defining = context, defining or context
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

    def _instance(self, node: ast.expr) -> tuple[bool, Class | None]:
        """Whether `node` is this class's instance or class (`self`, `cls`, `type(self)`, `super()`),
        and for `super()` the class after which attributes are looked up."""
        if self.context is None:
            return False, None
        if isinstance(node, ast.Name):
            return node.id in _SELF, None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "super":
                return True, self.defining
            if node.func.id == "type" and len(node.args) == 1:
                return self._instance(node.args[0])[0], None
        return False, None

    def reference(self, node: ast.expr) -> Target | None:
        """What a name or a chain of attributes of one refers to; None for anything else."""
        chain = []
        while isinstance(node, ast.Attribute):
            chain.append(node.attr)
            node = node.value
        instance, after = self._instance(node)
        if instance and chain:
            found = _self_attribute(self.context, chain.pop(), self.packages, after)
        elif isinstance(node, ast.Name):
            found = self.resolve(node.id)
            if found is not None and found[0] == "outside" and (node.id in self.local or node.id in self.module.imports
                                                               or not found[1].startswith("builtins.")):
                self.outside.add(f"{node.id}={found[1]}")
        else:
            return None
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
        if not isinstance(head, ast.Name) and not self._instance(head)[0]:  # `make().x.y`: what counts is in `make()`
            self.visit(head)
            return
        found = self.reference(node)
        if found == ("outside", "sys.modules"):
            self._whole(self.module.name)
        else:
            self._use(found)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        # A parameter's declaration names its default upstream task (`UpstreamParameter(Train)`), whose
        # version the identity holds already: not followed, so that a task does not count every upstream one.
        for child in [*node.decorator_list, *node.bases, *node.keywords,
                      *(statement for statement in node.body if not _is_parameter(self.module, statement, self.packages))]:
            self.visit(child)

    def visit_Call(self, node: ast.Call) -> None:
        called = self.reference(node.func)
        called = called[1] if called is not None and called[0] == "outside" else None
        if called in _WHOLE_MODULE_CALLS or (called == "builtins.vars" and not node.args):
            self._whole(self.module.name)
        elif called in _ATTRIBUTE_CALLS and len(node.args) >= 2:
            name = node.args[1]
            computed = not (isinstance(name, ast.Constant) and isinstance(name.value, str))
            if self._instance(node.args[0])[0]:
                self._use(("part", *self.context) if computed else _self_attribute(self.context, name.value,
                                                                                   self.packages))
            else:
                owner = self.reference(node.args[0])
                if owner is not None and owner[0] == "module":
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


def _definition(module: _Module, qualified: str, packages: tuple[str, ...]) -> tuple[Class | None, Class | None,
                                                                                         list[ast.stmt]]:
    """Part `qualified` of `module` (a top-level name, or `Class.attribute`, inherited or not): the
    class whose code it is (None for a function's), the class whose body holds it, and its statements."""
    if qualified == IMPORT_TIME:
        return None, None, module.on_import
    if qualified == MAIN:
        return None, None, module.main
    owner, _, name = qualified.rpartition(".")
    if not owner:
        statements = module.parts.get(name, [])
        context = (module.name, name) if statements and isinstance(statements[-1], ast.ClassDef) else None
        return context, context, statements
    context = (module.name, owner)
    order = (_mro(context, packages) or (context,)) if _class_def(context) is not None else ()
    defining = next((cls for cls in order if name in _members(cls)[0]), None)
    return context, defining, _members(defining)[0][name] if defining else []


def _without_parameters(statement: ast.stmt, module: _Module, packages: tuple[str, ...]) -> ast.stmt:
    """A class without its parameters' declarations, which count by their values (see `_is_parameter`)."""
    if not isinstance(statement, ast.ClassDef):
        return statement
    stripped = copy.copy(statement)
    stripped.body = [inner for inner in statement.body if not _is_parameter(module, inner, packages)]
    return stripped


@functools.lru_cache(maxsize=None)
def _part(module_name: str, qualified: str, packages: tuple[str, ...]) -> tuple[str, frozenset]:
    """The hash of one part and what it refers to."""
    context, defining, statements = _definition(_module(module_name), qualified, packages)
    if not statements:
        raise ConfigError(f"no {qualified!r} in {module_name}; expected a function, class, method or "
                          "constant defined at its module level, or a method of a class there or of its bases")
    for statement in statements:
        _strip(statement)  # in place, once per statement: stripping again changes nothing
    home = _module(defining[0] if defining else module_name)
    found = _References(home, packages, context, defining)
    found.scan(statements)
    hashed = [_without_parameters(statement, home, packages) for statement in statements]
    digest = hashlib.sha256("\n".join([_dump(hashed), *sorted(found.outside)]).encode()).hexdigest()
    # Running the part runs its module's import-time code, and what a star import brings may be anything.
    targets = {*found.targets, ("enter", module_name), ("enter", home.name),
               *(("whole", star) for star in home.stars if _followed(star, packages))}
    return digest[:HASH_LENGTH], frozenset(targets)


@functools.lru_cache(maxsize=None)
def _lineage(cls: Class, packages: tuple[str, ...]) -> str:
    """A class by its bases alone, recursively: `module:Name(base, ...)`."""
    references = _References(_module(cls[0]), packages)
    bases = []
    for base in _class_def(cls).bases:
        found = references.reference(base)
        if found is not None and found[0] in ("part", "bases") and _class_def(found[1:]) is not None:
            bases.append(_lineage(found[1:], packages))
        else:
            bases.append(found[1] if found is not None and found[0] == "outside" else ast.unparse(base))
    return f"{cls[0]}:{cls[1]}({', '.join(bases)})"


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
        elif kind == "bases":
            lineage = _lineage(target[1:], packages)
            counted[f"{module}:{target[2]}"] = hashlib.sha256(lineage.encode()).hexdigest()[:HASH_LENGTH]
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
    for cached in (_module_file, _module, _members, _bases, _mro, _part, _lineage, _identity):
        cached.cache_clear()
    importlib.invalidate_caches()  # the import system's listings of folders, where a new module may be
