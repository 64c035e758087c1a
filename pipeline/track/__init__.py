"""Everything that talks to MLflow for one run: starting and tagging runs, params, metrics, datasets
and the logged pyfunc model (tracking; the model's code file pyfunc_model, its folder cache
pyfunc_template, the served model serving), reading runs back (references), the registry, checkpoints
in run artifacts (run_checkpoints), evaluation logging, and tracking-server/machine checks (preflight).

May import: pipeline.train, pipeline.evaluate, pipeline.model, pipeline.data, pipeline.config, the shared
top-level modules, mlflow; never optuna, never pipeline.study, pipeline.prune or pipeline.run.
"""
