"""Tracking: the study in MLflow.

* ``store``: the tracking URI, checking it, the movable artifact store.
* ``runs``: ``Tracker`` (parent run, a child run per trial and baseline), ``NullTracker``.
* ``review``: the verdict, files and plots on the parent run.
* ``registry``: the best merge in the Model Registry.
* ``ui``: the MLflow server and the URL of a study's runs.
* ``provenance``: the git commit and package versions logged with each study.
"""
