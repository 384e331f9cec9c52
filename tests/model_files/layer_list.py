"""A model file as the classic "defining a model" write-ups lay one out: the network is a list of
layer specs in params, whose activations and regularizers are TensorFlow functions, read both
as a dict and by attribute; PREDICT returns {'output': logits}; EVAL reports only the loss.
"""
import tensorflow as tf

PARAMS = {
    "n_classes": None,  # filled in by the pipeline
    "layers": [  # AlexNet-style: conv, pool, then fully connected, each with its activation and regularizer
        {"type": "conv", "filters": 8, "kernel_size": 5, "activation": tf.nn.relu, "regularizer": tf.nn.l2_loss},
        {"type": "pool", "size": 2},
        {"type": "fc", "units": 32, "activation": tf.nn.relu, "regularizer": tf.nn.l2_loss},
    ],
    "weight_decay": 0.0005,  # scale of the summed regularizers in the loss
    "learning_rate": 0.05,  # momentum SGD step size
    "momentum": 0.9,  # momentum SGD momentum
}


def model_fn(features, labels, mode, params):
    net = features["image"]
    penalties = []
    for spec in params["layers"]:
        if spec["type"] == "conv":
            layer = tf.compat.v1.layers.Conv2D(spec["filters"], spec["kernel_size"], padding="same",
                                               activation=spec["activation"])
        elif spec["type"] == "pool":
            net = tf.compat.v1.layers.max_pooling2d(net, spec["size"], spec["size"])
            continue
        else:
            net = tf.compat.v1.layers.flatten(net)
            layer = tf.compat.v1.layers.Dense(spec["units"], activation=spec["activation"])
        net = layer(net)
        penalties.append(spec["regularizer"](layer.kernel))
    logits = tf.compat.v1.layers.dense(tf.compat.v1.layers.flatten(net), params.n_classes)

    if mode == tf.estimator.ModeKeys.PREDICT:
        return tf.estimator.EstimatorSpec(mode, predictions={"output": logits})

    loss = tf.compat.v1.losses.sparse_softmax_cross_entropy(labels, logits) + params.weight_decay * tf.add_n(penalties)
    if mode == tf.estimator.ModeKeys.EVAL:
        return tf.estimator.EstimatorSpec(mode, loss=loss)

    optimizer = tf.compat.v1.train.MomentumOptimizer(params.learning_rate, params.momentum)
    train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
    return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op)
