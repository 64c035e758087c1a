# The commands the README names. Every target builds its own .venv first, from scratch if absent.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
PYTEST_ARGS ?=
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core box spinning slowed training 4x.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test test-fast lint bench ui docs docs-serve clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

# The documentation tools, pinned apart from the runtime pins (requirements.txt).
$(VENV)/.installed-docs: $(VENV)/.installed requirements-docs.txt
	$(VENV)/bin/pip install --quiet -r requirements-docs.txt
	touch $@

# The whole pipeline, offline, on scikit-learn's digits (shipped in its wheel), upscaled to 16x16 RGB.
# No flip/crop augmentation: digits are not mirror-symmetric.
demo: install
	mlflow run . -e main --env-manager local --experiment-name demo \
		-P source=digits -P image_size=16 -P pretrain_epochs=4 -P finetune_epochs=3 \
		-P batch_size=64 -P augment=none -P frozen_layers=3
	@echo
	@echo "Runs are in ./mlflow.db. Look at them with:"
	@echo "  $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db"
	@# The UI opens on its GenAI (traces) view; workflowType=machine_learning lands on the runs table.
	@echo "then open http://127.0.0.1:5000/#/experiments/$$(MLFLOW_TRACKING_URI=sqlite:///mlflow.db $(PY) -c \
		'import mlflow; print(mlflow.get_experiment_by_name("demo").experiment_id)' 2>/dev/null)?workflowType=machine_learning"

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff, then the import contracts in pyproject.toml (package layers; no MLflow/Optuna in the core).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks.run

ui: install
	mlflow ui --backend-store-uri sqlite:///mlflow.db

# The site under site/: docs/ pages plus an API reference generated from pipeline/'s docstrings.
# --strict: a broken link, a missing page or a docstring mkdocstrings cannot read fails the build.
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(VENV)/bin/mkdocs build --strict

docs-serve: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(VENV)/bin/mkdocs serve

clean:
	rm -rf mlruns mlartifacts mlflow.db .pytest_cache site
