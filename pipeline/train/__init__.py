"""Training one network: the epoch loop fit() (loop), what it carries between epochs (state), the
resumable checkpoint file that saves that state (checkpoint), optimizer/scheduler (optim), EMA (ema).

May import: pipeline.evaluate (validation metrics), pipeline.model, pipeline.data, pipeline.config,
the shared top-level modules; never mlflow or optuna (the caller tracks through the epoch callback).
"""
