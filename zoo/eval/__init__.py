"""Evaluation: the one path from a model to metrics, shared by train.py, eval.py and the tests.

evaluator.py  zero-shot classification and retrieval (encoders, classifiers, metrics)
suite.py      `evaluate(model, eval_sets, tokenizer)`: built-in and family eval kinds by name
report.py     metrics.json and the printed tables
source.py     the model to evaluate: from a workdir, a zoo.save directory or a pretrained tag
"""
