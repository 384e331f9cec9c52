"""The rule by which the pipeline reads a model's predictions (pipeline.outputs), without TensorFlow."""
import re

import numpy as np
import pytest

from pipeline.errors import ModelDefinitionError
from pipeline.outputs import LOGITS, PROBABILITIES, OutputKeys, output_keys, read_outputs

N = 3
LOGITS_BATCH = np.array([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])


@pytest.mark.parametrize("outputs, expected", [
    # The tutorial's PREDICT spec: all three, class ids shaped [batch, 1].
    ({"class_ids": ([None, 1], False), "probabilities": ([None, N], True), "logits": ([None, N], True)},
     OutputKeys("probabilities", PROBABILITIES, "class_ids")),
    ({"logits": ([-1, N], True), "class_ids": ([-1], False)}, OutputKeys("logits", LOGITS, "class_ids")),
    # A single tensor is {"output": ...}; its values decide softmax.
    ({"output": ([2, N], True)}, OutputKeys("output", None, None)),
    # A premade's classification output: string classes beside float scores.
    ({"classes": ([None, N], False), "scores": ([None, N], True)}, OutputKeys("scores", None, None)),
    # class_ids of another shape is not taken for ids.
    ({"probabilities": ([None, N], True), "class_ids": ([None, 2], False)},
     OutputKeys("probabilities", PROBABILITIES, None)),
])
def test_where_the_scores_and_ids_are_found(outputs, expected):
    assert output_keys(outputs, N, "model.py") == expected


@pytest.mark.parametrize("outputs, seen", [
    ({"embedding": ([None, 8], True)}, "'embedding' [batch, 8]"),
    ({"a": ([None, N], True), "b": ([None, N], True)}, "'a' [batch, 3], 'b' [batch, 3]"),
    ({"classes": ([None, N], False)}, "'classes' [batch, 3] (not float)"),
    ({}, "nothing"),
])
def test_predictions_without_one_reading_name_what_was_seen_and_what_is_expected(outputs, seen):
    with pytest.raises(ModelDefinitionError, match=r"model.py: the PREDICT predictions are " + re.escape(seen)
                       + r"; expected class scores as 'probabilities' or 'logits' shaped \[batch, 3\]"):
        output_keys(outputs, N, "model.py")


def test_logits_are_turned_into_probabilities_and_ids_flattened():
    probabilities, ids = read_outputs({"logits": LOGITS_BATCH, "class_ids": np.array([[0], [2]])},
                                      OutputKeys("logits", LOGITS, "class_ids"))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    assert probabilities.argmax(axis=1).tolist() == [0, 1] and ids.tolist() == [0, 2], "the model's own ids are kept"


def test_an_unnamed_tensor_is_taken_as_probabilities_only_when_it_is_a_distribution():
    distribution = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    keys = OutputKeys("output", None, None)
    probabilities, ids = read_outputs(distribution, keys)
    np.testing.assert_allclose(probabilities, distribution)
    assert ids.tolist() == [0, 2]
    from_logits, ids = read_outputs(LOGITS_BATCH, keys)
    assert not np.allclose(from_logits, LOGITS_BATCH) and np.allclose(from_logits.sum(axis=1), 1.0)
    assert ids.tolist() == [0, 1]
