"""Flax models: T5 network, model wrappers (loss/eval/predict), decoding. TensorFlow-free."""
