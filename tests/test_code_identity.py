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
from pipeline.index import INDEX_FOLDER, read_index
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


def test_self_methods_and_their_bases_are_followed_and_an_exempt_base_adds_nothing(package):
    package.write(
        base="""
            # Scheduling only.
            AFFECTS_RESULTS = False

            class Scheduled:
                def helper(self):
                    return 'scheduled'
            """,
        mid=f"""
            from {package.name}.base import Scheduled

            class Mid(Scheduled):
                SCALE = 2

                def compute(self, x):
                    return x * type(self).SCALE

                def produce(self):
                    return 0
            """,
        a=f"""
            import luigi
            from {package.name}.mid import Mid

            class Stage(Mid):
                size = luigi.IntParameter(description="help text")

                def produce(self):
                    return self.compute(self.size) + super().produce() + len(self.helper()) + self.input()

                def unused(self):
                    return 1
            """)
    first = package.identity("a:Stage.produce")
    assert set(first) == {"a:Stage.produce", "a:Stage.compute", "a:Stage.SCALE", "mid:Mid.produce"}, \
        "a parameter, a luigi.Task method and an exempt base's method count nothing"
    package.write(mid=package.root.joinpath("mid.py").read_text().replace("x * type", "x + type"))
    assert changed(first, package.identity("a:Stage.produce")) == {"a:Stage.compute"}
    package.write(base=package.root.joinpath("base.py").read_text().replace("'scheduled'", "'elsewhere'"))
    package.write(a=package.root.joinpath("a.py").read_text().replace('"help text"', '"other help"')
                  .replace("return 1", "return 2"))
    assert changed(first, package.identity("a:Stage.produce")) == {"a:Stage.compute"}


def test_where_a_self_attribute_cannot_be_found_the_whole_class_counts(package):
    package.write(
        a="""
            import luigi

            def make_base():
                return object

            class Unknown(make_base()):
                def produce(self):
                    return self.anything()

            class Stateful:
                def __init__(self):
                    self.factor = 3

                def produce(self):
                    return self.factor

            class Computed:
                SEED = 1
                size = luigi.IntParameter(description="help text")

                def produce(self, name):
                    return getattr(self, name)
            """)
    assert {"a:Unknown", "a:make_base"} <= set(package.identity("a:Unknown.produce"))
    assert "a:Stateful" in package.identity("a:Stateful.produce"), "set in __init__: the class counts whole"
    computed = package.identity("a:Computed.produce")
    assert "a:Computed" in computed
    package.write(a=package.root.joinpath("a.py").read_text().replace('"help text"', '"other help"'))
    assert package.identity("a:Computed.produce") == computed, "a parameter counts by its value, not its declaration"
    package.write(a=package.root.joinpath("a.py").read_text().replace("SEED = 1", "SEED = 2"))
    assert changed(computed, package.identity("a:Computed.produce")) == {"a:Computed"}


def test_an_exempt_modules_classes_count_by_their_bases_alone(package):
    package.write(
        errors="""
            # What goes wrong, and what it is called.
            AFFECTS_RESULTS = False

            class Failure(Exception):
                pass

            class Unusable(Failure):
                def __init__(self, message):
                    super().__init__(f"unusable: {message}")
            """,
        a=f"""
            from {package.name} import errors

            def f(x):
                try:
                    return int(x)
                except errors.Unusable:
                    return None
            """)
    first = package.identity("a:f")
    assert set(first) == {"a:f", "errors:Unusable"}
    package.write(errors=package.root.joinpath("errors.py").read_text().replace("unusable: ", "cannot use: "))
    assert package.identity("a:f") == first, "a message does not count"
    package.write(errors=package.root.joinpath("errors.py").read_text().replace("Unusable(Failure)", "Unusable(ValueError)"))
    assert changed(first, package.identity("a:f")) == {"errors:Unusable"}, "the hierarchy decides what is caught"


def test_a_raised_messages_wording_and_log_calls_do_not_count(package):
    source = """
        import logging
        import warnings

        log = logging.getLogger(__name__)

        def f(x, limit):
            if x > limit:
                raise ValueError(f"x={x} is over {limit}; expected at most " + "that")
            log.info("checked %s", x)
            return x
        """
    package.write(a=source)
    first = package.identity("a:f")
    package.write(a=source.replace("is over", "exceeds").replace('"that"', '"the limit"')
                  .replace('log.info("checked %s", x)', 'log.warning("saw %s", x)\n            warnings.warn("x")'))
    assert package.identity("a:f") == first
    package.write(a=source.replace("x={x}", "x={limit}"))
    assert changed(first, package.identity("a:f")) == {"a:f"}, "what a message interpolates counts"
    package.write(a=source.replace("raise ValueError", "raise KeyError"))
    assert changed(first, package.identity("a:f")) == {"a:f"}, "the exception's type counts"
    package.write(a=source.replace('+ "that")', '+ "that", "shard-1")'))
    assert changed(first, package.identity("a:f")) == {"a:f"}, "an argument beside the message counts"
    package.write(a=source.replace('log.info("checked %s", x)', 'log.info("checked %s", x.pop())'))
    assert "a:f" in changed(first, package.identity("a:f")), "a log statement that acts counts"


def test_imports_under_a_module_level_if_or_try_are_followed(package):
    package.write(
        a=f"""
            import sys
            if sys.version_info >= (3, 8):
                from {package.name}.b import g
            try:
                from {package.name}.b import h
            except ImportError:
                h = None

            def f():
                return g() + h()
            """,
        b="def g():\n    return 1\n\ndef h():\n    return 2\n")
    assert {"a:f", "b:g", "b:h", "a:<import>"} <= set(package.identity("a:f"))


def test_a_star_import_from_outside_counts_by_what_it_binds_not_by_its_source(package):
    package.write(a="from json import *\n\ndef f(x):\n    return dumps(x)\n")
    first = package.identity("a:f")
    assert set(first) == {"a:f"}, "json's own source does not count"
    package.write(a="from pickle import *\n\ndef f(x):\n    return dumps(x)\n")
    assert changed(first, package.identity("a:f")) == {"a:f"}


STAGES = ("Download", "Convert", "Train", "Evaluate", "Predict", "Report", "Bless", "RunRecord", "Comparison")


def stage_codes(source: Path) -> dict[str, dict[str, str]]:
    """Every stage's code identity, computed from the code in `source` by the code there, without TensorFlow."""
    probe = textwrap.dedent(f"""
        import json, sys
        import tasks
        from pipeline import fingerprint
        print(json.dumps({{name: fingerprint.code_identity(getattr(tasks, name).code_entry_points())
                          for name in {STAGES!r}}}))
        assert "tensorflow" not in sys.modules
        """)
    result = subprocess.run([sys.executable, "-c", probe], cwd=source, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(source)})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def real_stages(tmp_path_factory) -> tuple[Path, dict[str, dict[str, str]]]:
    folder = tmp_path_factory.mktemp("stages")
    return folder, stage_codes(copy_code(folder / "unedited"))


def stages_changed(real_stages, *edits: tuple[str, str, str]) -> set[str]:
    """The stages whose code identity a copy of the code with `edits` ((file, old, new), each once) changes."""
    folder, before = real_stages
    source = edited_code(folder)
    for path, old, new in edits:
        edit(source / path, old, new)
    after = stage_codes(source)
    return {name for name in STAGES if after[name] != before[name]}


def test_the_stages_count_what_they_run_and_no_module_that_cannot_change_a_result(real_stages):
    _, parts = real_stages
    every = {part for found in parts.values() for part in found}
    assert not any(part.startswith(("pipeline.storage:", "pipeline.locks:", "pipeline.progress:", "pipeline.netns:",
                                    "tasks.console:", "tasks.config:stage_folder", "tasks.base:Stage."))
                   for part in every)
    assert {"pipeline.convert:load_image", "tasks.stages:ConvertShard.produce"} <= set(parts["Convert"])
    assert "pipeline.convert:load_image" not in parts["Report"] and "pipeline.report:render_report" in parts["Report"]
    assert {"tasks.stages:Train.run_config", "tasks.stages:Train.role_arguments"} <= set(parts["Train"])
    assert {"tasks.runs:Comparison.rows", "tasks.stages:Evaluate.entry"} <= set(parts["Comparison"])


def test_the_rule_for_which_files_are_data_changes_the_stages_that_list_them(real_stages):
    assert stages_changed(real_stages, ("pipeline/datafiles.py", '_HIDDEN_PREFIXES = (".", "__MACOSX")',
                                        '_HIDDEN_PREFIXES = (".", "__MACOSX", "Thumbs.db")')) == \
        {"Download", "Convert", "Predict"}


def test_what_a_stage_reaches_through_self_changes_its_version(real_stages):
    assert stages_changed(real_stages, ("tasks/stages.py", "for key in RUN_CONFIG_KEYS}",
                                        'for key in RUN_CONFIG_KEYS if key != "tf_random_seed"}')) == {"Train"}
    assert stages_changed(real_stages, ("tasks/stages.py", '"strategy": self.strategy,', '"strategy": "mirrored",')) \
        == {"Train"}
    assert stages_changed(real_stages, ("tasks/runs.py", "for evaluate in self.evaluations()], own)",
                                        "for evaluate in self.evaluations()][:1], own)")) == {"Comparison"}
    assert stages_changed(real_stages, ("tasks/stages.py", '"global_step": metrics["global_step"]',
                                        '"global_step": metrics["global_step"] + 1')) == {"Comparison"}


def test_the_errors_hierarchy_counts_and_messages_and_logs_do_not(real_stages):
    assert stages_changed(real_stages, ("pipeline/errors.py", "class UnusableImage(DatasetError):",
                                        "class UnusableImage(PipelineError):")) == {"Convert", "Predict"}
    assert stages_changed(
        real_stages,
        ("pipeline/errors.py", "super().__init__(message)", 'super().__init__(f"corrupt shard: {message}")'),
        ("pipeline/convert.py", "expected a positive number of pixels", "expected a number of pixels above 0"),
        ("pipeline/download.py", 'log.warning("skipping %s (label %s)', 'log.info("left out: %s (label %s)'),
        ("pipeline/estimator.py", 'log.warning("the validation split is empty', 'log.info("no validation split')) == set()


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
    return set(read_index(str(folder / "results" / INDEX_FOLDER)))


def assert_nothing_runs(folder: Path, config: Path, source: Path) -> None:
    lines = explain(folder, config, "RunAll", source=source)
    assert lines[-1] == "0 of 16 tasks will run.", "\n".join(lines)
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
                             "Bless", "RunRecord", "RunAll"}
    assert_named(lines, "Convert", "pipeline.convert._normalised")


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
