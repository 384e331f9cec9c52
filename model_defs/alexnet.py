"""An AlexNet-style convnet built from a list of layer specs, as in the classic layer configs.

`PARAMS["layers"]` is the full-size AlexNet (96@11/4 ... fc 4096, 2048) followed by an
n_classes logits layer; pass a smaller list through `--params` for small images or quick runs.
Standalone: imports only TensorFlow.
"""
import tensorflow as tf

PARAMS = {
    "n_classes": None,  # number of classes; the pipeline sets it from the dataset's label map
    # The network before the logits. Each entry: "type" conv|pool|fc; conv and fc take
    # "num_outputs", "activation" (a tf.nn name or None) and "regularizer" (L2 scale, 0 for none);
    # conv and pool take "kernel_size" and "stride". Padding is "same" so small images fit.
    "layers": [
        {"type": "conv", "num_outputs": 96, "kernel_size": 11, "stride": 4, "activation": "relu", "regularizer": 0.0005},
        {"type": "pool", "kernel_size": 3, "stride": 2},
        {"type": "conv", "num_outputs": 256, "kernel_size": 5, "stride": 1, "activation": "relu", "regularizer": 0.0005},
        {"type": "pool", "kernel_size": 3, "stride": 2},
        {"type": "conv", "num_outputs": 384, "kernel_size": 3, "stride": 1, "activation": "relu", "regularizer": 0.0005},
        {"type": "conv", "num_outputs": 384, "kernel_size": 3, "stride": 1, "activation": "relu", "regularizer": 0.0005},
        {"type": "conv", "num_outputs": 256, "kernel_size": 3, "stride": 1, "activation": "relu", "regularizer": 0.0005},
        {"type": "pool", "kernel_size": 3, "stride": 2},
        {"type": "fc", "num_outputs": 4096, "activation": "relu", "regularizer": 0.0005},
        {"type": "fc", "num_outputs": 2048, "activation": "relu", "regularizer": 0.0005},
    ],
    "dropout_rate": 0.5,  # fraction of each fc layer's activations dropped while training
    "learning_rate": 0.01,  # momentum SGD step size
    "momentum": 0.9,  # momentum SGD momentum
}


def _activation(spec):
    name = spec.get("activation")
    return getattr(tf.nn, name) if name else None


def model_fn(features, labels, mode, params):
    training = mode == tf.estimator.ModeKeys.TRAIN
    net = features["image"]
    penalties = []
    for index, spec in enumerate(params["layers"]):
        kind = spec["type"]
        if kind == "conv":
            layer = tf.keras.layers.Conv2D(spec["num_outputs"], spec["kernel_size"], spec["stride"], padding="same",
                                           activation=_activation(spec), name=f"conv{index}")
            net = layer(net)
        elif kind == "pool":
            net = tf.keras.layers.MaxPool2D(spec["kernel_size"], spec["stride"], padding="same")(net)
            continue
        elif kind == "fc":
            if len(net.shape) > 2:
                net = tf.keras.layers.Flatten()(net)
            layer = tf.keras.layers.Dense(spec["num_outputs"], activation=_activation(spec), name=f"fc{index}")
            net = tf.keras.layers.Dropout(params["dropout_rate"])(layer(net), training=training)
        else:
            raise ValueError(f"layers[{index}] has type {kind!r}; expected 'conv', 'pool' or 'fc'")
        if spec.get("regularizer"):
            penalties.append(spec["regularizer"] * tf.nn.l2_loss(layer.kernel))
    if len(net.shape) > 2:
        net = tf.keras.layers.Flatten()(net)
    logits = tf.keras.layers.Dense(params["n_classes"], name="logits")(net)

    class_ids = tf.argmax(logits, axis=1)
    predictions = {"class_ids": class_ids, "probabilities": tf.nn.softmax(logits), "logits": logits}
    if mode == tf.estimator.ModeKeys.PREDICT:
        return tf.estimator.EstimatorSpec(mode, predictions=predictions)

    loss = tf.compat.v1.losses.sparse_softmax_cross_entropy(labels, logits)
    if penalties:
        loss += tf.add_n(penalties)
    accuracy = tf.compat.v1.metrics.accuracy(labels, class_ids, name="accuracy_metric")
    if mode == tf.estimator.ModeKeys.EVAL:
        return tf.estimator.EstimatorSpec(mode, loss=loss, predictions=predictions,
                                          eval_metric_ops={"accuracy": accuracy})

    tf.compat.v1.summary.scalar("accuracy", tf.reduce_mean(tf.cast(tf.equal(class_ids, labels), tf.float32)))
    optimizer = tf.compat.v1.train.MomentumOptimizer(params["learning_rate"], params["momentum"])
    train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
    return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op)
