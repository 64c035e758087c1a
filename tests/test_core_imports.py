"""The core (training, device, models, data loading) imports neither MLflow nor Optuna, so it runs
and is reused without them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_core_modules_import_neither_mlflow_nor_optuna():
    code = ("import sys; "
            "import pipeline.train.loop, pipeline.model.device, pipeline.model.models, pipeline.prune.pruning; "
            "import pipeline.data.loader; "
            "print(sorted(m for m in ('mlflow', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr
