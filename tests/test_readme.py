"""What the docs show works as printed: the smallest model file of docs/model-files.md trains, the
README fits on a few screens, and every relative link in the README and docs/ leads somewhere."""
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pipeline import models
from pipeline.estimator import check_predictions, run_params
from tests.conftest import REPO

README_MAX_LINES = 150
DOCS = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
# [text](target) outside code: a target without a scheme (http:, mailto:) is a path in this repository.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)


def test_the_smallest_model_file_in_the_docs_passes_the_contract_and_trains(tmp_path):
    [source, *_] = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "model-files.md").read_text(), re.DOTALL)
    (tmp_path / "smallest.py").write_text(source)
    model = models.load_model(tmp_path / "smallest.py")
    dataset = {"n_classes": 3, "image_shape": [8, 8, 1]}
    params = run_params(model, models.merge_params(model.path, model.defaults, {}, {"n_classes": 3}), dataset)

    assert check_predictions(model, params, dataset).scores == "logits"
    images = np.random.default_rng(0).random((12, 8, 8, 1), dtype=np.float32)
    estimator = tf.estimator.Estimator(model.model_fn, str(tmp_path / "model_dir"), params=params)
    estimator.train(lambda: tf.data.Dataset.from_tensor_slices(({"image": images}, np.arange(12) % 3)).batch(4),
                    max_steps=2)
    assert estimator.get_variable_value("global_step") == 2


def test_the_readme_fits_in_150_lines():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move the detail to a page in docs/"


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of `page`: lower case, punctuation dropped, spaces as
    hyphens, a repeated one numbered."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#+ (.+)$", CODE.sub("", page.read_text()), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


@pytest.mark.parametrize("page", DOCS, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    broken = []
    for target in LINK.findall(CODE.sub("", page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in set(anchors(linked)):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: {broken}"


def test_every_page_in_docs_is_linked_from_the_readme():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in LINK.findall((REPO / "README.md").read_text())}
    unlinked = [page.name for page in (REPO / "docs").glob("*.md") if page.resolve() not in linked]
    assert not unlinked, f"docs/ pages the README does not link: {unlinked}"
