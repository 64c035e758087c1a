"""Scoring a trained network and judging the scores, in memory: score_net (scoring), metrics,
bootstrap intervals and paired McNemar/F1 tests (stats), temperature calibration, per-image
predictions tables, plots, metric-safe class keys (keys), the compare plot (compare_plot) and the
transfer study's table, verdict and accuracy-vs-depth plot (transfer).

May import: pipeline.model, pipeline.data, pipeline.config, the shared top-level modules; never mlflow
or optuna (logging a report to a run is pipeline.track.evaluation_logging's).
"""
