"""A custom DNN over feature columns, as in TensorFlow's Iris custom-Estimator tutorial.

The image enters as one numeric feature column of its full shape. Standalone: imports only TensorFlow.
"""
import tensorflow as tf

PARAMS = {
    "n_classes": None,  # number of classes; the pipeline sets it from the dataset's label map
    "hidden_units": [256, 128],  # width of each hidden ReLU layer, input side first
    "learning_rate": 0.05,  # Adagrad step size, as in the tutorial
}


def model_fn(features, labels, mode, params):
    image_column = tf.feature_column.numeric_column("image", shape=features["image"].shape[1:].as_list())
    net = tf.compat.v1.feature_column.input_layer(features, [image_column])
    for units in params["hidden_units"]:
        net = tf.keras.layers.Dense(units, activation="relu")(net)
    logits = tf.keras.layers.Dense(params["n_classes"])(net)

    class_ids = tf.argmax(logits, axis=1)
    predictions = {"class_ids": class_ids, "probabilities": tf.nn.softmax(logits), "logits": logits}
    if mode == tf.estimator.ModeKeys.PREDICT:
        return tf.estimator.EstimatorSpec(mode, predictions=predictions)

    loss = tf.compat.v1.losses.sparse_softmax_cross_entropy(labels, logits)
    accuracy = tf.compat.v1.metrics.accuracy(labels, class_ids, name="accuracy_metric")
    if mode == tf.estimator.ModeKeys.EVAL:
        return tf.estimator.EstimatorSpec(mode, loss=loss, predictions=predictions,
                                          eval_metric_ops={"accuracy": accuracy})

    tf.compat.v1.summary.scalar("accuracy", tf.reduce_mean(tf.cast(tf.equal(class_ids, labels), tf.float32)))
    optimizer = tf.compat.v1.train.AdagradOptimizer(params["learning_rate"])
    train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
    return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op)
