"""How the pipeline reads a model's predictions, whatever the model named them.

A PREDICT spec's predictions (and so an export's serving outputs) may be one tensor or a dict of
them; one tensor counts as {"output": tensor}, as the Estimator's own `PredictOutput` has it.
From them the pipeline takes:

- the class scores: "probabilities" shaped [batch, n_classes]; else "logits" of that shape, with
  softmax applied; else the one float tensor of that shape, taken as probabilities when every row
  is non-negative and sums to 1, and as logits otherwise;
- the class ids: "class_ids" shaped [batch] or [batch, 1]; else the argmax of the scores.

`output_keys` applies the rule to names and shapes (a model's PREDICT spec before training, an
export's signature), `read_outputs` to the arrays a batch gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from pipeline.errors import ModelDefinitionError

SINGLE_OUTPUT = "output"
PROBABILITIES, LOGITS, CLASS_IDS = "probabilities", "logits", "class_ids"
# A shape, with None (or -1, as a signature writes it) for a dimension that is not known.
Shape = Sequence[Optional[int]]


@dataclass(frozen=True)
class OutputKeys:
    scores: str
    # PROBABILITIES, LOGITS, or None when the values tell (an unnamed tensor).
    scores_are: Optional[str]
    class_ids: Optional[str]


def _is_scores(shape: Shape, n_classes: int) -> bool:
    return len(shape) == 2 and shape[1] == n_classes


def _is_class_ids(shape: Shape) -> bool:
    return len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)


def output_keys(outputs: Mapping[str, tuple[Shape, bool]], n_classes: int, source: str) -> OutputKeys:
    """Where the class scores and ids are among `outputs` (name -> (shape, whether float)).

    Raises ModelDefinitionError naming `source`, the outputs seen and what was expected."""
    def fits(name: str) -> bool:
        return name in outputs and outputs[name][1] and _is_scores(outputs[name][0], n_classes)

    if fits(PROBABILITIES):
        scores, scores_are = PROBABILITIES, PROBABILITIES
    elif fits(LOGITS):
        scores, scores_are = LOGITS, LOGITS
    else:
        candidates = sorted(name for name in outputs if fits(name))
        if len(candidates) != 1:
            seen = ", ".join(f"{name!r} {_describe(shape)}{'' if floating else ' (not float)'}"
                             for name, (shape, floating) in sorted(outputs.items())) or "nothing"
            raise ModelDefinitionError(
                f"{source}: the PREDICT predictions are {seen}; expected class scores as 'probabilities' or "
                f"'logits' shaped [batch, {n_classes}], or a single float tensor of that shape (optionally "
                "'class_ids' shaped [batch] or [batch, 1]): see docs/model-files.md")
        scores, scores_are = candidates[0], None
    class_ids = CLASS_IDS if CLASS_IDS in outputs and _is_class_ids(outputs[CLASS_IDS][0]) else None
    return OutputKeys(scores, scores_are, class_ids)


def _describe(shape: Shape) -> str:
    return "[" + ", ".join("batch" if index == 0 and (size is None or size < 0) else str(size)
                           for index, size in enumerate(shape)) + "]"


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def read_outputs(batch: Mapping[str, np.ndarray] | np.ndarray, keys: OutputKeys) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [batch, n_classes], class ids [batch]) from one batch of a model's outputs."""
    if not isinstance(batch, Mapping):
        batch = {SINGLE_OUTPUT: batch}
    scores = np.asarray(batch[keys.scores], dtype=np.float64)
    is_distribution = np.all(scores >= 0) and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3)
    if keys.scores_are == LOGITS or (keys.scores_are is None and not is_distribution):
        scores = _softmax(scores)
    class_ids = (np.asarray(batch[keys.class_ids]).reshape(-1) if keys.class_ids
                 else np.argmax(scores, axis=1))
    return scores, class_ids.astype(np.int64)
