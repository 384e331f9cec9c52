"""The pipeline's library: every stage's logic, free of Luigi, taking plain paths and values.

TensorFlow is imported only by the modules that need it (schema, estimator, training, evaluation,
prediction), so scheduling and no-op reruns never pay for it.
"""
