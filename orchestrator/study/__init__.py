"""The study: search spaces, the trial, its record, samplers and pruners, storage and workers.

* ``spaces``: ``search_spaces/*.yaml`` -> Optuna distributions, checked against each method.
* ``candidates``: the models merged, resolved and checked; the recipes of trials and baselines.
* ``resident``: the one loaded model, its merger and evaluator.
* ``objective``: one trial (suggest, merge, evaluate rung by rung) -> a ``records.TrialRecord``.
* ``records``: the trial record and the study's notes, the one place that reads and writes
  Optuna user attributes.
* ``samplers``, ``pruners``: the registries (``options``: their shared option parsing).
* ``group``: a study's Optuna studies (one per method in a fair comparison).
* ``storage``: storage URLs, the study lock; ``workers``: the worker loop, liveness, signals.
* ``fingerprint``: what defines a study, checked on resume.
"""
