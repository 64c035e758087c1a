"""Logging many pyfunc models of one kind cheaply: the model folder is built by MLflow once per process
and copied for each model, with only its weights and metadata swapped.

`mlflow.pyfunc.log_model` costs about half a second a model on a CPU before any file is copied: it
checks every pinned requirement against the installed packages, loads the models-from-code file and
copies the `pipeline` package. None of that depends on the weights, so a tune worker pays it once.
Each model is still logged through `mlflow.models.Model.log` (a LoggedModel linked to the run, its
params and metrics, `runs:/<run id>/model` and `models:/<model id>` both resolve), and its folder is
a complete pyfunc model: MLmodel, python_model.py, code/pipeline, requirements, conda and python env.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mlflow import pyfunc
from mlflow.models import Model, ModelSignature
from mlflow.pyfunc.model import CONFIG_KEY_ARTIFACTS

MLMODEL = "MLmodel"
PYFUNC_FROM_CODE = "pyfunc.ModelFromCode"  # the flavor name mlflow.pyfunc.log_model records for a code file

# (what the folder depends on) -> a saved pyfunc model folder; one per process and key
_templates: dict[tuple, str] = {}


def template_dir(key: tuple, save: Callable[[str], None]) -> str:
    """The model folder for `key`, saved by save(path) (an mlflow.pyfunc.save_model call) the first time."""
    if key not in _templates:
        root = tempfile.mkdtemp(prefix="pipeline-pyfunc-")
        atexit.register(shutil.rmtree, root, True)
        path = os.path.join(root, "model")
        save(path)
        _templates[key] = path
    return _templates[key]


def forget_templates() -> None:
    """Drop the saved folders (tests; a process that changes its requirements mid-way)."""
    for path in _templates.values():
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    _templates.clear()


class TemplateFlavor:
    """A flavor "module" for mlflow.models.Model.log: save_model copies the template folder, then
    write_artifacts({artifact name: path in the copy}) puts this model's own files over the template's."""

    __name__ = "mlflow.pyfunc"

    def __init__(self, template: str, write_artifacts: Callable[[dict[str, Path]], None], signature: ModelSignature):
        self.template, self.write_artifacts, self.signature = template, write_artifacts, signature

    def save_model(self, path: str, mlflow_model: Model, **kwargs) -> None:
        _link_tree(self.template, path)
        saved = Model.load(os.path.join(self.template, MLMODEL))
        artifacts = saved.flavors[pyfunc.FLAVOR_NAME][CONFIG_KEY_ARTIFACTS]
        files = [entry["path"] for entry in artifacts.values()]
        self.write_artifacts({name: _unlinked(Path(path, entry["path"])) for name, entry in artifacts.items()})
        # Model.log made mlflow_model with this model's ids (run, LoggedModel, artifact location);
        # how to load it comes from the template.
        mlflow_model.flavors = saved.flavors
        mlflow_model.signature = self.signature
        # As pyfunc counts it (its artifacts and code file, not the shipped code): the template's, for these files.
        mlflow_model.model_size_bytes = saved.model_size_bytes + _size(path, files) - _size(self.template, files)
        mlflow_model.save(os.path.join(path, MLMODEL))


def _size(folder: str, files: list[str]) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in files)


def _link_tree(src: str, dst: str) -> None:
    """Hard links where the file system allows (the copy is read once, by the upload, then deleted)."""
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


def _unlinked(path: Path) -> Path:
    """Unlink a file about to be rewritten: it may be a hard link to the template's, which must stay."""
    path.unlink(missing_ok=True)
    return path
