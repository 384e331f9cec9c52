"""A small convnet: conv/pool blocks, a dense layer with dropout, and softmax logits.

The default for the embedded MNIST sample. Standalone: imports only TensorFlow, so this file
can be copied next to its checkpoints and rebuilt from there.
"""
import tensorflow as tf

PARAMS = {
    "n_classes": None,  # number of classes; the pipeline sets it from the dataset's label map
    "conv_filters": [32, 64],  # output channels of each conv layer; each is followed by 2x2 max pooling
    "kernel_size": 5,  # side of every conv kernel, in pixels
    "dense_units": 128,  # width of the fully connected layer before the logits
    "dropout_rate": 0.25,  # fraction of dense activations dropped while training
    "learning_rate": 0.001,  # Adam step size
}


def model_fn(features, labels, mode, params):
    training = mode == tf.estimator.ModeKeys.TRAIN
    net = features["image"]
    for filters in params["conv_filters"]:
        net = tf.keras.layers.Conv2D(filters, params["kernel_size"], padding="same", activation="relu")(net)
        net = tf.keras.layers.MaxPool2D(2, padding="same")(net)
    net = tf.keras.layers.Flatten()(net)
    net = tf.keras.layers.Dense(params["dense_units"], activation="relu")(net)
    net = tf.keras.layers.Dropout(params["dropout_rate"])(net, training=training)
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
    optimizer = tf.compat.v1.train.AdamOptimizer(params["learning_rate"])
    train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
    return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op)
