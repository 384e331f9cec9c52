"""A model file shaped as TensorFlow's custom-Estimator tutorial teaches (custom_estimator.py and
its `my_model`), with the TF1 names it uses spelled tf.compat.v1, as TensorFlow 2 needs:

- the function is called my_model, not model_fn;
- the input goes through params['feature_columns'], which the tutorial builds from its data;
- PREDICT returns class_ids shaped [batch, 1], probabilities and logits;
- EVAL returns the loss and eval_metric_ops only, no predictions;
- tf.compat.v1.layers.dense and the Adagrad optimizer.
"""
import tensorflow as tf

PARAMS = {
    "feature_columns": None,  # filled in by the pipeline: the image as one numeric column
    "hidden_units": [10, 10],  # two hidden layers of ten units
    "n_classes": None,  # filled in by the pipeline from the dataset
}


def my_model(features, labels, mode, params):
    """A DNN model_fn: hidden ReLU layers over the feature columns, then logits."""
    net = tf.compat.v1.feature_column.input_layer(features, params["feature_columns"])
    for units in params["hidden_units"]:
        net = tf.compat.v1.layers.dense(net, units=units, activation=tf.nn.relu)
    logits = tf.compat.v1.layers.dense(net, params["n_classes"], activation=None)

    predicted_classes = tf.argmax(logits, 1)
    if mode == tf.estimator.ModeKeys.PREDICT:
        predictions = {
            "class_ids": predicted_classes[:, tf.newaxis],
            "probabilities": tf.nn.softmax(logits),
            "logits": logits,
        }
        return tf.estimator.EstimatorSpec(mode, predictions=predictions)

    # As in the tutorial, one-hot labels for its three classes.
    onehot_labels = tf.one_hot(labels, 3, 1, 0)
    loss = tf.compat.v1.losses.softmax_cross_entropy(onehot_labels=onehot_labels, logits=logits)
    accuracy = tf.compat.v1.metrics.accuracy(labels=labels, predictions=predicted_classes, name="acc_op")
    metrics = {"accuracy": accuracy}
    tf.compat.v1.summary.scalar("accuracy", accuracy[1])
    if mode == tf.estimator.ModeKeys.EVAL:
        return tf.estimator.EstimatorSpec(mode, loss=loss, eval_metric_ops=metrics)

    optimizer = tf.compat.v1.train.AdagradOptimizer(learning_rate=0.1)
    train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
    return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op)
