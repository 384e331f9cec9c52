"""The premade `tf.estimator.DNNClassifier`, behind the same model-file contract as custom models.

`model_fn` builds the premade Estimator and returns the spec of its own model function, so
its network, head, loss and metrics are TensorFlow's. Only the serving signature is replaced:
the premade one is a string-label classification output, while the pipeline's batch
prediction reads the `probabilities` and `class_ids` predictions like any other model's.
Standalone: imports only TensorFlow.
"""
import tensorflow as tf

PARAMS = {
    "n_classes": None,  # number of classes; the pipeline sets it from the dataset's label map
    "hidden_units": [256, 128],  # width of each hidden layer, input side first
    "dropout": None,  # fraction of activations dropped while training, or None for no dropout
    "learning_rate": 0.05,  # Adagrad step size (DNNClassifier's default optimizer)
}


def model_fn(features, labels, mode, params, config):
    classifier = tf.estimator.DNNClassifier(
        hidden_units=params["hidden_units"],
        feature_columns=[tf.feature_column.numeric_column("image", shape=features["image"].shape[1:].as_list())],
        n_classes=params["n_classes"],
        dropout=params["dropout"],
        optimizer=lambda: tf.keras.optimizers.legacy.Adagrad(params["learning_rate"]),
        config=config,
    )
    spec = classifier.model_fn(features, labels, mode, config)
    if mode == tf.estimator.ModeKeys.PREDICT:
        serving = tf.estimator.export.PredictOutput(spec.predictions)
        return spec._replace(export_outputs={tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY: serving})
    return spec
