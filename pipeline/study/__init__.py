"""Optuna studies and their MLflow parent runs: opening a study and its sampler/pruner (setup), its
storage and heartbeats (storage), the parent and trial runs (tracking), trials counted against the
budget (trial_accounting), the Pareto front and pick (front), the summary and best-model
registration logged on the parent (summary). The trial loop that drives them is pipeline.run.tuning.

May import: pipeline.track and everything below it, pipeline.pareto, optuna and mlflow; never
pipeline.prune or pipeline.run.
"""
