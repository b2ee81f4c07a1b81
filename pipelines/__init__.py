"""The Ray layer and the `mova` command line (stages: data, features, labels, train, serve, eval).

Modules here orchestrate; the model math lives in :mod:`mova`.
"""
