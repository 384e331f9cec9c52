"""Code identity by meaning (pipeline.fingerprint): on small packages written here, and the rule on a
completed tree: a copy of the project's code, edited, then `tasks.explain` and the real `luigi`."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from pipeline import fingerprint
from pipeline.errors import ConfigError
from tests.conftest import REPO, cli_sections, run_watched, write_config
from tests.test_explain_gc import explain, reasons_of


class Synthetic:
    """A package of its own name in `folder`, importable (never imported) while a test runs."""

    def __init__(self, folder: Path):
        self.name = f"synthetic_{uuid.uuid4().hex[:8]}"
        self.root = folder / self.name
        self.root.mkdir()
        (self.root / "__init__.py").write_text("")

    def write(self, **modules: str) -> None:
        for module, source in modules.items():
            (self.root / f"{module}.py").write_text(textwrap.dedent(source))

    def identity(self, *entry_points: str) -> dict[str, str]:
        """The code identity of `entry_points` (`module:name` within the package), read afresh,
        with the package's name left out of its keys."""
        fingerprint.forget()
        code = fingerprint.code_identity([f"{self.name}.{entry}" for entry in entry_points], packages=[self.name])
        return {name.removeprefix(f"{self.name}."): digest for name, digest in code.items()}


@pytest.fixture
def package(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield Synthetic(tmp_path)
    fingerprint.forget()


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}


def test_comments_docstrings_annotations_and_formatting_do_not_count(package):
    package.write(a='''
        """A module."""
        LIMIT = 3


        def f(x: int) -> int:
            """Doubles, up to LIMIT."""
            # a comment
            return min(x * 2, LIMIT)
        ''')
    first = package.identity("a:f")
    assert set(first) == {"a:f", "a:LIMIT"}
    package.write(a='''
        """Another docstring, and a comment below."""
        # here
        LIMIT = (3)
        def f(x: "float"):
            """Reworded."""
            return min(x*2,
                       LIMIT)  # another comment
        ''')
    assert package.identity("a:f") == first
    package.write(a='LIMIT = 4\ndef f(x):\n    return min(x * 2, LIMIT)\n')
    assert changed(first, package.identity("a:f")) == {"a:LIMIT"}, "a real change is found, and named"


def test_calls_are_followed_across_modules_and_only_what_is_called_counts(package):
    package.write(
        a='''
            from {pkg}.b import g
            from {pkg} import c
            import {pkg}.d

            def f():
                return g() + c.h() + {pkg}.d.k()
            '''.format(pkg=package.name),
        b="def g():\n    return helper()\n\ndef helper():\n    return 1\n\ndef unused():\n    return 2\n",
        c="class Thing:\n    def method(self):\n        return 3\n\ndef h():\n    return Thing().method()\n",
        d="class Box:\n    inner = 4\n\ndef k():\n    return Box().inner.real\n")
    first = package.identity("a:f")
    assert set(first) == {"a:f", "b:g", "b:helper", "c:h", "c:Thing", "d:k", "d:Box"}
    package.write(b="def g():\n    return helper()\n\ndef helper():\n    return 1\n\ndef unused():\n    return 20\n")
    assert package.identity("a:f") == first, "a function nothing calls does not count"
    package.write(c="class Thing:\n    def method(self):\n        return 30\n\ndef h():\n    return Thing().method()\n")
    assert changed(first, package.identity("a:f")) == {"c:Thing"}, "a class counts whole, its methods included"


def test_a_module_that_says_it_cannot_change_a_result_is_not_entered(package):
    package.write(
        a=f"from {package.name} import quiet\n\ndef f():\n    quiet.note()\n    return 1\n",
        quiet="# Only says what happens.\nAFFECTS_RESULTS = False\n\ndef note():\n    print('one')\n")
    first = package.identity("a:f")
    assert set(first) == {"a:f"}
    package.write(quiet="AFFECTS_RESULTS = False\n\ndef note():\n    print('two')\n")
    assert package.identity("a:f") == first


def test_where_the_source_does_not_say_what_runs_the_whole_module_counts(package):
    package.write(
        a=f"from {package.name} import b\n\ndef f(name):\n    return getattr(b, name)()\n\n"
          "def g():\n    return 1\n",
        b="def one():\n    return 1\n\ndef two():\n    return 2\n",
        c="def f(name):\n    return globals()[name]()\n\ndef other():\n    return 3\n",
        d="import importlib\n\ndef f(name):\n    return importlib.import_module(name)\n")
    assert set(package.identity("a:f")) == {"a:f", "b:one", "b:two"}
    assert set(package.identity("c:f")) == {"c:f", "c:other"}
    assert {"a:f", "a:g", "b:one", "b:two", "c:other", "d:f"} <= set(package.identity("d:f")), \
        "an import of a computed name counts every module of the package"


def test_code_run_at_import_counts_for_every_function_of_its_module(package):
    package.write(a="import random\nrandom.seed(1)\n\ndef f():\n    return random.random()\n\n"
                    "if __name__ == '__main__':\n    print(f())\n")
    first = package.identity("a:f")
    assert set(first) == {"a:f", "a:<import>"}, "the __main__ block does not run at import"
    assert set(package.identity("a:__main__")) == {"a:__main__", "a:f", "a:<import>"}
    package.write(a="import random\nrandom.seed(2)\n\ndef f():\n    return random.random()\n")
    assert changed(first, package.identity("a:f")) == {"a:<import>"}


def test_an_unknown_entry_point_is_refused_naming_it(package):
    package.write(a="def f():\n    return 1\n")
    with pytest.raises(ConfigError, match=r"no 'g' in synthetic_\w+\.a"):
        package.identity("a:g")
    with pytest.raises(ConfigError, match="expected 'module:name'"):
        package.identity("a.f")


def test_a_model_file_counts_by_its_syntax_tree_and_other_files_by_their_bytes():
    source = (REPO / "model_defs" / "cnn.py").read_bytes()
    commented = source.replace(b"\n", b"  # a comment\n", 1) + b'\n"""A trailing string."""\n'
    assert fingerprint.normalised_source(commented) == fingerprint.normalised_source(source)
    assert fingerprint.normalised_source(source + b"\nEXTRA = 1\n") != fingerprint.normalised_source(source)
    assert fingerprint.normalised_source(b"not python (") == b"not python ("


def test_the_stages_count_what_they_run_without_tensorflow():
    probe = textwrap.dedent("""
        import json, sys
        from tasks import Convert, Download, Report, RunRecord, Train
        print(json.dumps({cls.__name__: sorted(__import__("pipeline.fingerprint").fingerprint.code_identity(
            cls.code_entry_points())) for cls in (Download, Convert, Train, Report, RunRecord)}))
        assert "tensorflow" not in sys.modules
        """)
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    parts = json.loads(result.stdout)
    every = {part for found in parts.values() for part in found}
    assert not any(part.startswith(("pipeline.storage:", "pipeline.errors:", "pipeline.progress:",
                                    "pipeline.netns:")) for part in every)
    assert {"pipeline.convert:load_image", "tasks.stages:ConvertShard.produce"} <= set(parts["Convert"])
    assert "pipeline.convert:load_image" not in parts["Report"] and "pipeline.report:render_report" in parts["Report"]
    assert parts["RunRecord"] == ["tasks.runs:RunRecord.produce"]


# The rule, on a completed tree.

@pytest.fixture(scope="module")
def completed(tmp_path_factory, mnist_subset):
    """A tiny RunAll, completed by a copy of the project's code (`source`)."""
    folder = tmp_path_factory.mktemp("rule")
    source = copy_code(folder / "source")
    config = write_config(folder / "luigi.cfg", cli_sections(folder, mnist_subset.as_uri()))
    result = run_watched(folder, config, "RunAll", "--local-scheduler", env={"PYTHONPATH": str(source)})
    assert result.returncode == 0, result.output[-3000:]
    return folder, config


def copy_code(target: Path) -> Path:
    for part in ("pipeline", "tasks", "model_defs"):
        shutil.copytree(REPO / part, target / part, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def edited_code(folder: Path) -> Path:
    """A fresh copy of the project's code, for one test to edit."""
    return copy_code(folder / f"edited-{uuid.uuid4().hex[:8]}")


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path} should hold {old!r} once"
    path.write_text(text.replace(old, new))


def with_comments_and_docstrings_edited(source: str) -> str:
    """`source` with a comment line above every function's body and at the top, and every docstring
    extended."""
    lines = source.splitlines(keepends=True)
    edits = []  # (line, column, text), applied from the last
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) or not body:
            continue
        first = body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            segment = lines[first.end_lineno - 1][:first.end_col_offset]
            quotes = 3 if segment.endswith(('"""', "'''")) else 1
            edits.append((first.end_lineno - 1, first.end_col_offset - quotes, " Edited."))
        if not isinstance(node, ast.Module) and first.lineno > node.lineno:
            edits.append((first.lineno - 1, 0, " " * first.col_offset + "# an edited comment\n"))
    for line, column, text in sorted(edits, reverse=True):
        lines[line] = lines[line][:column] + text + lines[line][column:]
    return "# an edited comment\n" + "".join(lines)


def snapshot(folder: Path) -> dict[str, int]:
    """Every file the pipeline wrote, with its modification time."""
    return {str(path): path.stat().st_mtime_ns for root in ("data", "results")
            for path in (folder / root).rglob("*") if path.is_file()}


def index_keys(folder: Path) -> set[str]:
    return set(json.loads((folder / "results" / "index.json").read_text()))


def assert_nothing_runs(folder: Path, config: Path, source: Path) -> None:
    lines = explain(folder, config, "RunAll", source=source)
    assert lines[-1] == "0 of 15 tasks will run.", "\n".join(lines)
    before = snapshot(folder)
    result = run_watched(folder, config, "RunAll", "--local-scheduler", env={"PYTHONPATH": str(source)})
    assert result.returncode == 0 and "ran successfully" not in result.output, result.output[-3000:]
    assert snapshot(folder) == before, "a no-op run wrote nothing"


def to_run(lines: list[str]) -> set[str]:
    return {re.match(r"to run  (\w+)\(", line).group(1) for line in lines if line.startswith("to run")}


@pytest.mark.slow
def test_comments_and_docstrings_edited_in_every_module_rerun_nothing(completed):
    folder, config = completed
    source = edited_code(folder)
    modules = [*(source / "pipeline").glob("*.py"), *(source / "tasks").glob("*.py")]
    for module in modules:
        module.write_text(with_comments_and_docstrings_edited(module.read_text()))
    assert len(modules) > 25 and all(module.read_text().startswith("# an edited comment") for module in modules)
    assert_nothing_runs(folder, config, source)


@pytest.mark.slow
def test_the_locks_timing_and_an_exceptions_message_rerun_nothing(completed):
    folder, config = completed
    source = edited_code(folder)
    # Wherever the S3 lock's code lives (storage, or a module of its own that says it cannot change a result).
    [lock_module] = [path for path in (source / "pipeline").glob("*.py") if "\n_LOCK_RETRY_S = " in path.read_text()]
    edit(lock_module, "\n_LOCK_RETRY_S = 0.1\n", "\n_LOCK_RETRY_S = 0.25\n")
    edit(lock_module, "\nLOCK_TTL_S = 30.0\n", "\nLOCK_TTL_S = 45.0\n")
    edit(source / "pipeline" / "errors.py", "super().__init__(message)",
         'super().__init__(f"corrupt shard: {message}")')
    assert_nothing_runs(folder, config, source)


def explained_edit(completed: tuple[Path, Path], module: str, old: str, new: str) -> tuple[Path, list[str]]:
    """A fresh copy of the code with one edit of `pipeline/<module>`, and what `tasks.explain RunAll` says then."""
    folder, config = completed
    source = edited_code(folder)
    edit(source / "pipeline" / module, old, new)
    return source, explain(folder, config, "RunAll", source=source)


def assert_named(lines: list[str], family: str, part: str) -> None:
    assert any(why.startswith(f"code changed: {part} (closest completed: {family}@")
               for why in reasons_of(lines, family)), "\n".join(lines)


@pytest.mark.slow
def test_a_change_to_how_images_are_decoded_reruns_convert_and_what_follows(completed):
    _, lines = explained_edit(completed, "convert.py", "Image.Resampling.BILINEAR", "Image.Resampling.BICUBIC")
    assert [line for line in lines if line.startswith("done")] == [line for line in lines
                                                                   if line.startswith("done    Download(")]
    assert to_run(lines) == {"PlanConversion", "ConvertShard", "Convert", "Train", "Evaluate", "Predict", "Report",
                             "RunRecord", "RunAll"}
    assert_named(lines, "Convert", "pipeline.convert._normalised_png")


@pytest.mark.slow
def test_a_change_to_how_the_report_is_rendered_reruns_the_report_alone(completed):
    folder, config = completed
    source, lines = explained_edit(completed, "report.py", "<h2>Per class</h2>", "<h2>Per-class scores</h2>")
    # The run's record names the report's folder, so it follows the report; no stage that computes does.
    assert to_run(lines) == {"Report", "RunRecord", "RunAll"}, "\n".join(lines)
    assert_named(lines, "Report", "pipeline.report.render_report")

    before = index_keys(folder)
    result = run_watched(folder, config, "RunAll", "--local-scheduler", env={"PYTHONPATH": str(source)})
    assert result.returncode == 0, result.output[-3000:]
    assert {key.split("/")[0] for key in index_keys(folder) - before} == {"Report", "RunRecord"}
    assert len([path for path in (folder / "results").rglob("report.html")
                if "Per-class scores" in path.read_text()]) == 1
