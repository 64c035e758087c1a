"""Class folders named as people name them, walked through every step: prepare_data, pretrain with
register_as, evaluate (a dataset and an image folder), compare, the registry and the served model.

MLflow refuses most of these names inside a metric key (`test_f1_bird (small)`); each step must
still run, and everything a person reads (tables, CSVs, the model's output) must show the names.
"""

import csv
import io

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from sklearn.metrics import f1_score

from pipeline.config import CompareConfig, EvaluateConfig, PrepareConfig, TrainConfig
from pipeline.data.store import load_dataset
from pipeline.run.compare import compare
from pipeline.run.evaluation_run import run_evaluate
from pipeline.run.runners import run_prepare, run_train
from pipeline.track.evaluation_logging import load_class_keys

NAMES = [
    "bird (small)", "it's", 'say "hi"', "a+b & c", "#1 % off", "x,y;z", "7up", "long-name-" * 15,
    "猫", "кошка", "macro",  # `macro` would read as the macro average in `test_f1_macro`
]
IMAGES_PER_CLASS = 6


def _write_folder(root):
    """IMAGES_PER_CLASS noisy 12x12 PNGs per class, each class its own colour."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(NAMES):
        folder = root / name
        folder.mkdir(parents=True)
        color = np.array([(37 * k) % 256, (91 * k + 40) % 256, (151 * k + 80) % 256])
        for i in range(IMAGES_PER_CLASS):
            pixels = np.clip(color + rng.integers(-10, 11, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


def test_awkward_class_names_work_in_every_step(store, tmp_path):
    assert len(NAMES[7]) == 150
    mlflow.set_experiment("awkward")
    _write_folder(tmp_path / "photos")
    prep = run_prepare(PrepareConfig(source=str(tmp_path / "photos"), image_size=8, val_fraction=0.25,
                                     test_fraction=0.25))
    ds, _ = load_dataset(mlflow.artifacts.download_artifacts(f"runs:/{prep}/dataset"))
    names = ds.class_names
    assert sorted(names) == sorted(NAMES)

    pre = run_train(TrainConfig(data=prep, arch="resnet9", epochs=1, batch_size=16, augment="none", precision="fp32",
                                device="cpu", system_metrics=False, register_as="awkward"), "pretrain")
    ev = run_evaluate(EvaluateConfig(model=pre, data=prep, device="cpu", precision="fp32"))
    ev_folder = run_evaluate(EvaluateConfig(model=pre, data=str(tmp_path / "photos"), device="cpu", precision="fp32"))

    # The served model (the registered version) answers with the names as the folders had them.
    model = mlflow.pyfunc.load_model("models:/awkward@champion")
    test = ds.splits["test"]
    out = model.predict(test.images)
    assert list(out.columns) == ["class_name", "confidence", *(f"prob_{n}" for n in names)]
    probs = out[[f"prob_{n}" for n in names]].to_numpy()
    assert list(out["class_name"]) == [names[i] for i in probs.argmax(1)]
    pred = np.array([names.index(c) for c in out["class_name"]])

    # Per-class metrics under keys MLflow accepts, mapped back to the names by class_keys.json.
    keys = load_class_keys(ev)
    assert sorted(keys.values()) == sorted(names)
    logged = mlflow.get_run(ev).data.metrics
    f1 = f1_score(test.labels, pred, labels=range(len(names)), average=None, zero_division=0)
    name_of_key = {name: key for key, name in keys.items()}
    assert [logged[f"test_f1_{name_of_key[n]}"] for n in names] == pytest.approx(list(f1))
    assert logged["test_f1_macro"] == pytest.approx(f1.mean())  # not overwritten by the class `macro`

    # The confusion CSV reads back with the names, quotes and commas included.
    text = mlflow.artifacts.load_text(f"runs:/{ev}/evaluation/test_confusion_matrix.csv")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["true/predicted", *names] and [r[0] for r in rows[1:]] == names
    assert sum(int(v) for r in rows[1:] for v in r[1:]) == len(test)

    # compare: per-class columns named by class; `macro` keeps its key rather than shadow the average.
    table, _ = compare(
        CompareConfig(experiment="awkward", output=str(tmp_path / "t.csv"), plot=str(tmp_path / "t.png"))
    )
    row = table[table.evaluate_run_id == ev].iloc[0]
    for n, value in zip(names, f1):
        column = f"test_f1_{name_of_key[n]}" if n == "macro" else f"test_f1_{n}"
        assert row[column] == pytest.approx(value), n
    assert row["test_f1_macro"] == pytest.approx(f1.mean())
    assert set(pd.read_csv(tmp_path / "t.csv").columns) == set(table.columns)
    assert (tmp_path / "t.png").stat().st_size > 0
    folder_row = table[table.evaluate_run_id == ev_folder].iloc[0]  # the image folder: all its images scored
    assert mlflow.get_run(ev_folder).data.metrics["skipped_files"] == 0
    assert all(f"test_f1_{n}" in folder_row.index for n in names if n != "macro")

    # The registry's description names the classes as they are.
    version = MlflowClient().get_model_version_by_alias("awkward", "champion")
    assert all(f"`` {n} ``" in version.description for n in names)
