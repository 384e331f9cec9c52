"""Every model file: its contract, each mode on random tensors, and two real training steps."""
import ast
import inspect
import sys

import numpy as np
import pytest
import tensorflow as tf

from pipeline import models, runfiles
from pipeline.estimator import ProgressHook, build_estimator, check_predictions, run_params
from pipeline.errors import ConfigError, ModelDefinitionError
from pipeline.storage import write_json

N_CLASSES = 3
SHAPE = (28, 28, 1)
SMALL_ALEXNET = {"layers": [
    {"type": "conv", "num_outputs": 8, "kernel_size": 5, "stride": 2, "activation": "relu", "regularizer": 0.001},
    {"type": "pool", "kernel_size": 3, "stride": 2},
    {"type": "conv", "num_outputs": 8, "kernel_size": 3, "stride": 1, "activation": "relu", "regularizer": 0.0},
    {"type": "fc", "num_outputs": 16, "activation": "relu", "regularizer": 0.001},
]}
OVERRIDES = {"alexnet": SMALL_ALEXNET, "cnn": {"conv_filters": [4, 8], "dense_units": 16}}
MODEL_NAMES = models.available_models()


def test_the_required_models_exist():
    assert {"cnn", "alexnet", "dnn", "premade_dnn"} <= set(MODEL_NAMES)


DATASET = {"n_classes": N_CLASSES, "image_shape": list(SHAPE)}


def load(name):
    model_file = models.resolve_model_file(name)
    model = models.load_model(model_file)
    recorded = models.merge_params(model_file, model.defaults, OVERRIDES.get(name, {}), {"n_classes": N_CLASSES})
    return model, run_params(model, recorded, DATASET)


def call_model_fn(model, params, mode):
    features = {"image": tf.random.uniform((4, *SHAPE))}
    labels = tf.random.uniform((4,), maxval=N_CLASSES, dtype=tf.int64)
    kwargs = {"config": tf.estimator.RunConfig()} if "config" in inspect.signature(model.model_fn).parameters else {}
    with tf.compat.v1.variable_scope("model"):
        tf.compat.v1.train.get_or_create_global_step()
        return model.model_fn(features, None if mode == tf.estimator.ModeKeys.PREDICT else labels, mode,
                              params, **kwargs)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_file_imports_only_tensorflow_and_the_standard_library(name):
    tree = ast.parse(models.resolve_model_file(name).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"tensorflow"} | set(sys.stdlib_module_names)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("mode", [tf.estimator.ModeKeys.PREDICT, tf.estimator.ModeKeys.EVAL,
                                  tf.estimator.ModeKeys.TRAIN])
def test_model_fn_in_each_mode(name, mode):
    model, params = load(name)
    with tf.Graph().as_default():
        spec = call_model_fn(model, params, mode)
        assert isinstance(spec, tf.estimator.EstimatorSpec) and spec.mode == mode
        if mode == tf.estimator.ModeKeys.TRAIN:
            assert spec.loss.shape.rank == 0 and spec.train_op is not None
            return
        # The pipeline's own model files name their predictions as the Estimator guides do.
        probabilities = spec.predictions["probabilities"]
        assert probabilities.shape.as_list() == [4, N_CLASSES] and probabilities.dtype == tf.float32
        assert spec.predictions["class_ids"].dtype == tf.int64
        if mode == tf.estimator.ModeKeys.EVAL:
            assert spec.loss.shape.rank == 0 and "accuracy" in spec.eval_metric_ops and spec.train_op is None
        else:
            assert spec.loss is None
            serving = spec.export_outputs[tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY]
            assert "probabilities" in serving.outputs


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_two_training_steps(name, tmp_path):
    model, params = load(name)
    assert check_predictions(model, params, DATASET).scores == "probabilities"
    images = np.random.default_rng(0).random((16, *SHAPE), dtype=np.float32)
    labels = np.arange(16) % N_CLASSES
    estimator = tf.estimator.Estimator(model.model_fn, str(tmp_path), params=params)
    estimator.train(lambda: tf.data.Dataset.from_tensor_slices(({"image": images}, labels)).repeat().batch(4),
                    max_steps=2)
    assert estimator.get_variable_value("global_step") == 2


def test_params_merge_rejects_unknown_keys_and_dataset_keys():
    model_file = models.resolve_model_file("cnn")
    defaults = models.load_model(model_file).defaults
    with pytest.raises(ConfigError, match=r"\['dropout'\], unknown to cnn.py; its params are conv_filters"):
        models.merge_params(model_file, defaults, {"dropout": 0.1})
    with pytest.raises(ConfigError, match="takes from the dataset"):
        models.merge_params(model_file, defaults, {"n_classes": 4})


def test_unknown_model_lists_the_available_ones():
    with pytest.raises(ModelDefinitionError, match="model_def='resnet'.*expected one of alexnet, cnn, dnn"):
        models.resolve_model_file("resnet")


def test_model_file_without_model_fn_is_rejected(tmp_path):
    (tmp_path / "empty.py").write_text("PARAMS = {}\n")
    with pytest.raises(ModelDefinitionError, match="defines no model_fn"):
        models.load_model(tmp_path / "empty.py")


def test_a_model_file_whose_one_model_function_has_another_name_is_taken_as_is(tmp_path):
    (tmp_path / "tutorial.py").write_text("PARAMS = {}\n\ndef helper(x):\n    return x\n\n"
                                          "def my_model(features, labels, mode, params):\n    return None\n")
    assert models.load_model(tmp_path / "tutorial.py").model_fn.__name__ == "my_model"
    (tmp_path / "two.py").write_text("PARAMS = {}\n\ndef a(features, labels, mode, params):\n    pass\n\n"
                                     "def b(features, labels, mode):\n    pass\n")
    with pytest.raises(ModelDefinitionError, match="it has a, b: name the one to use model_fn"):
        models.load_model(tmp_path / "two.py")


def test_a_lambda_in_params_is_refused_naming_its_key_before_tensorflow(tmp_path):
    (tmp_path / "lambdas.py").write_text("import tensorflow as tf\nPARAMS = {'layers': [{'units': 3, "
                                         "'activation': lambda x: tf.nn.relu(x)}]}\n")
    with pytest.raises(ConfigError, match=r"PARAMS\['layers'\]\[0\]\['activation'\] is a lambda"):
        models.declared_param_keys(tmp_path / "lambdas.py")


def test_predictions_the_pipeline_cannot_read_fail_before_training_saying_what_it_saw(tmp_path):
    (tmp_path / "embedding.py").write_text(
        "import tensorflow as tf\nPARAMS = {'n_classes': None}\n\n"
        "def model_fn(features, labels, mode, params):\n"
        "    net = tf.compat.v1.layers.flatten(features['image'])\n"
        "    return tf.estimator.EstimatorSpec(mode, predictions={'embedding': tf.compat.v1.layers.dense(net, 8)})\n")
    model = models.load_model(tmp_path / "embedding.py")
    with pytest.raises(ModelDefinitionError, match=r"embedding.py: the PREDICT predictions are 'embedding' \[2, 8\]; "
                                                   r"expected class scores as 'probabilities' or 'logits' shaped "
                                                   r"\[batch, 3\]"):
        check_predictions(model, {"n_classes": N_CLASSES}, DATASET)


def test_training_params_must_be_positive():
    with pytest.raises(ConfigError, match="max_steps=0"):
        models.validate_training_settings(0, 8, {key: 1 for key in models.RUN_CONFIG_KEYS})


@pytest.mark.parametrize("name", ["cnn", "premade_dnn"])
def test_training_progress_counts_global_steps_across_a_resume(name, tmp_path):
    model_file = models.resolve_model_file(name)
    model_dir = tmp_path / "model_dir"
    model_dir.mkdir()
    (model_dir / runfiles.MODEL_FILE).write_bytes(model_file.read_bytes())
    write_json(model_dir / runfiles.PARAMS_FILE, models.merge_params(
        model_file, models.load_model(model_file).defaults, OVERRIDES.get(name, {}), {"n_classes": N_CLASSES}))
    write_json(model_dir / runfiles.DATASET_FILE, DATASET)
    write_json(model_dir / runfiles.RUN_CONFIG_FILE, {"tf_random_seed": 1, "save_checkpoints_steps": 3})
    reports = []
    estimator = build_estimator(
        model_dir, lambda loss: [ProgressHook(lambda *report: reports.append(report), 5, loss)])
    images = np.random.default_rng(0).random((8, *SHAPE), dtype=np.float32)
    labels = np.arange(8) % N_CLASSES

    def input_fn():
        return tf.data.Dataset.from_tensor_slices(({"image": images}, labels)).repeat().batch(4)

    estimator.train(input_fn, max_steps=3)
    estimator.train(input_fn, max_steps=5)  # resumes from the checkpoint at step 3

    assert [(done, total, unit) for done, total, unit, _ in reports] == [(step, 5, "steps") for step in range(1, 6)]
    assert all(detail.startswith("loss ") and float(detail[5:]) >= 0 for *_, detail in reports)


def test_tensorflow_functions_in_params_are_recorded_by_name_and_read_back():
    from pipeline.params import as_params, from_json, to_json

    params = {"layers": [{"activation": tf.nn.relu, "regularizer": tf.nn.l2_loss}, {"activation": tf.nn.softmax}],
              "initializer": tf.keras.initializers.GlorotUniform, "optimizer": tf.compat.v1.train.AdagradOptimizer,
              "rate": 0.1}
    recorded = to_json(params)
    assert recorded["layers"] == [{"activation": "tf.nn.relu", "regularizer": "tf.nn.l2_loss"},
                                  {"activation": "tf.nn.softmax"}]
    assert recorded["initializer"] == "tf.keras.initializers.GlorotUniform"
    assert recorded["optimizer"] == "tf.compat.v1.train.AdagradOptimizer"
    assert from_json(recorded) == params
    readable = as_params(from_json(recorded))
    assert readable.rate == readable["rate"] == 0.1 and readable.layers[0].activation is tf.nn.relu
    copied = __import__("copy").deepcopy(readable)  # as the Estimator copies its params
    assert copied.layers[1].activation is tf.nn.softmax


@pytest.mark.parametrize("value", [lambda x: x, len, np.zeros(2)])
def test_what_cannot_be_named_is_refused_naming_its_key(value):
    from pipeline.params import to_json

    with pytest.raises(ConfigError, match=r"params\['layers'\]\[0\]\['activation'\] is .*cannot be recorded"):
        to_json({"layers": [{"activation": value}]})


def test_a_name_that_is_no_tensorflow_function_is_refused_naming_its_key():
    from pipeline.params import from_json

    with pytest.raises(ConfigError, match=r"--params\['activation'\] is 'tf.nn.rleu', which names no TensorFlow"):
        from_json({"activation": "tf.nn.rleu"}, "--params")
