"""The sweep: composes the layers into the main job (``run.run_sweep`` is the page to read).

* ``setup``: the checks before any model loads; ``session``: joining a study.
* ``run``: one worker from start to end; ``progress``: the line per trial.
* ``finish``: the conclusion (confirm, statistics, best merge, report, MLflow review).
"""
