"""Stages: data, training, profiling, merging, evaluation, serving. A stage never imports another's internals."""
