"""Structural channel pruning of a trained network (pruning: prune_channels, measure_cost, the
per-trial pruning of a tune) and the prune step's run: prune, recover, score, log (pruning_run).

May import: pipeline.track and everything below it, mlflow; never optuna, pipeline.study or
pipeline.run.
"""
