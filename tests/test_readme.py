"""What the README shows works as printed: the smallest model file of "Adding a model"."""
import re

import numpy as np
import tensorflow as tf

from pipeline import models
from pipeline.estimator import check_predictions, run_params
from tests.conftest import REPO


def test_the_smallest_model_file_in_the_readme_passes_the_contract_and_trains(tmp_path):
    section = (REPO / "README.md").read_text().split("## Adding a model", 1)[1]
    [source] = re.findall(r"```python\n(.*?)```", section.split("## ", 1)[0], re.DOTALL)
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
