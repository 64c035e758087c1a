"""The logged model as users call it (in-process pyfunc, `mlflow models predict`, `mlflow models
serve` over HTTP) and the runs as a tracking server shows them over its REST API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score

from pipeline.data.store import load_dataset
from pipeline.model.models import create_model
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


_env = subprocess_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | str | None = None) -> tuple[int, bytes]:
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body)).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _start_server(args: list[str], ready_path: str, port: int, log: Path) -> subprocess.Popen:
    """Start a server on 127.0.0.1:port and wait until ready_path answers 200."""
    out = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", *args], cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if _http(f"http://127.0.0.1:{port}{ready_path}")[0] == 200:
                return proc
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"server not ready after 180 s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def test_split(trained):
    ds, _ = load_dataset(mlflow.artifacts.download_artifacts(f"runs:/{trained.prepare}/dataset"), ("test",))
    return ds.splits["test"], ds.class_names


def _reference_predictions(run_id: str, images: np.ndarray) -> np.ndarray:
    """Class indices from the run's plain state dict, normalizing by hand: independent of the pyfunc."""
    logits, _ = _hand_logits(run_id, images)
    return logits.argmax(1)


def test_pyfunc_model_returns_class_names_and_probabilities(trained, test_split):
    test, class_names = test_split
    model = mlflow.pyfunc.load_model(f"runs:/{trained.finetune}/model")
    out = model.predict(test.images)
    probs = out[[f"prob_{c}" for c in class_names]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert np.allclose(out["confidence"], probs.max(1))
    pred = out["class_name"].map(class_names.index).to_numpy()
    assert (pred == _reference_predictions(trained.finetune, test.images)).mean() > 0.99
    # The same model scored by the evaluate step: same accuracy from the served predictions.
    evaluated = mlflow.get_run(trained.evaluate).data.metrics["test_accuracy"]
    assert accuracy_score(test.labels, pred) == pytest.approx(evaluated, abs=0.01)
    assert evaluated > 0.5  # a real classifier on 10 digit classes, not chance (0.1)


def test_pyfunc_accepts_one_image_of_another_size_and_rejects_bad_shapes(trained):
    model = mlflow.pyfunc.load_model(f"runs:/{trained.finetune}/model")
    assert len(model.predict(np.full((1, 40, 24, 3), 128, np.uint8))) == 1
    with pytest.raises(Exception, match=r"Shape of input \(2, 8, 8\) does not match"):
        model.predict(np.zeros((2, 8, 8), np.uint8))


@pytest.fixture
def image_files(test_split, tmp_path) -> list[str]:
    test, _ = test_split
    paths = []
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(test.images[i]).save(path)
        paths.append(str(path))
    return paths


def _make_request(files: list[str], tmp_path: Path) -> Path:
    done = subprocess.run(
        [sys.executable, "-m", "steps.make_request", *files],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    path = tmp_path / "request.json"
    path.write_text(done.stdout)
    return path


def test_make_request_refuses_a_file_that_is_not_an_image(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    done = subprocess.run(
        [sys.executable, "-m", "steps.make_request", str(bad)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "cannot read image" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_mlflow_models_serve_answers_http_requests(trained, test_split, image_files, tmp_path):
    _, class_names = test_split
    expected = mlflow.pyfunc.load_model(f"runs:/{trained.finetune}/model").predict(
        np.stack([np.asarray(Image.open(p).convert("RGB")) for p in image_files])
    )
    request = _make_request(image_files, tmp_path)
    port = _free_port()
    proc = _start_server(
        [
            "models",
            "serve",
            "-m",
            f"runs:/{trained.finetune}/model",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        "/ping",
        port,
        tmp_path / "serve.log",
    )
    try:
        status, body = _http(f"http://127.0.0.1:{port}/invocations", request.read_text())
        assert status == 200, body
        predictions = json.loads(body)["predictions"]
        assert [p["class_name"] for p in predictions] == list(expected["class_name"])
        assert set(predictions[0]) == {"class_name", "confidence", *[f"prob_{c}" for c in class_names]}
        assert [p["confidence"] for p in predictions] == pytest.approx(list(expected["confidence"]), abs=1e-5)
        # A malformed request gets a client error that names the problem, and the server stays up.
        status, body = _http(f"http://127.0.0.1:{port}/invocations", {"inputs": [[1, 2, 3]]})
        assert 400 <= status < 500 and b"shape" in body.lower()
        assert _http(f"http://127.0.0.1:{port}/ping")[0] == 200
    finally:
        _stop(proc)


@pytest.mark.slow
def test_mlflow_models_predict_cli(trained, image_files, tmp_path):
    request = _make_request(image_files, tmp_path)
    out = tmp_path / "predictions.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "predict",
            "-m",
            f"runs:/{trained.finetune}/model",
            "-i",
            str(request),
            "-t",
            "json",
            "-o",
            str(out),
            "--env-manager",
            "local",
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    predictions = json.loads(out.read_text())["predictions"]
    assert len(predictions) == len(image_files) and all("class_name" in p for p in predictions)


@pytest.mark.slow
def test_tracking_server_serves_runs_metrics_and_confusion_matrix(trained, tmp_path):
    port = _free_port()
    proc = _start_server(
        [
            "server",
            "--backend-store-uri",
            os.environ["MLFLOW_TRACKING_URI"],
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        "/health",
        port,
        tmp_path / "server.log",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        status, body = _http(
            f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [trained.experiment_id], "max_results": 100}
        )
        assert status == 200, body
        runs = {r["info"]["run_id"]: r for r in json.loads(body)["runs"]}
        assert {trained.prepare, trained.pretrain, trained.finetune, trained.evaluate} <= set(runs)
        served = {m["key"]: m["value"] for m in runs[trained.evaluate]["data"]["metrics"]}
        local = mlflow.get_run(trained.evaluate).data.metrics
        assert served["test_accuracy"] == pytest.approx(local["test_accuracy"])
        assert served["test_f1_macro"] == pytest.approx(local["test_f1_macro"])
        tags = {t["key"]: t["value"] for t in runs[trained.evaluate]["data"]["tags"]}
        assert tags["pipeline.step"] == "evaluate" and tags["pipeline.upstream.model_run"] == trained.finetune

        status, body = _http(f"{base}/api/2.0/mlflow/artifacts/list?run_id={trained.evaluate}&path=evaluation")
        assert status == 200, body
        files = {f["path"] for f in json.loads(body)["files"]}
        assert {"evaluation/test_confusion_matrix.csv", "evaluation/test_confusion_matrix.png"} <= files
        status, body = _http(
            f"{base}/get-artifact?path=evaluation/test_confusion_matrix.csv&run_uuid={trained.evaluate}"
        )
        assert status == 200
        local_csv = Path(
            mlflow.artifacts.download_artifacts(f"runs:/{trained.evaluate}/evaluation/test_confusion_matrix.csv")
        ).read_text()
        assert body.decode() == local_csv
        rows = [line.split(",") for line in local_csv.strip().splitlines()[1:]]
        assert sum(int(v) for row in rows for v in row[1:]) == int(
            mlflow.get_run(trained.prepare).data.metrics["test_images"]
        )
    finally:
        _stop(proc)


def test_models_logged_before_the_pyfunc_still_load(trained, tmp_path):
    """Earlier versions logged an MLflow PyTorch model with the state dict under extra_files/."""
    import shutil

    from pipeline.track import references

    old = tmp_path / "old-model"
    shutil.copytree(mlflow.artifacts.download_artifacts(f"runs:/{trained.finetune}/model"), old)
    (old / "artifacts").rename(old / "extra_files")
    state, meta = references.load_model_ref(str(old))
    current, _ = references.load_model_ref(trained.finetune)
    assert meta["arch"] == "resnet18" and all(torch.equal(state[k], current[k]) for k in current)


def _in_process_pyfunc(image_size: int = 8):
    """The pyfunc's predict with a small network, without logging a model."""
    from pipeline.model.models import ImageClassifier
    from pipeline.track.serving import ImageClassifierModel

    torch.manual_seed(0)
    model = ImageClassifierModel()
    model.meta = {"class_names": ["a", "b", "c"]}
    model.device = torch.device("cpu")
    model.temperature = 1.0
    model.classifier = ImageClassifier(create_model("resnet9", 3), ["a", "b", "c"], image_size).eval()
    return model


def _old_path_probabilities(classifier, images: np.ndarray) -> np.ndarray:
    """What the pyfunc computed before resizing first: normalize the full-size floats, then resize."""
    x = torch.from_numpy(images).float()
    x = ((x - torch.from_numpy(MEAN) * 255) / (torch.from_numpy(STD) * 255)).permute(0, 3, 1, 2)
    size = classifier.image_size
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    with torch.no_grad():
        return torch.softmax(classifier.net(x.contiguous(memory_format=torch.channels_last)), 1).numpy()


@pytest.mark.parametrize("shape", [(5, 8, 8), (4, 40, 24), (3, 5, 7), (2, 64, 64)])
def test_pyfunc_resizing_first_predicts_what_normalizing_first_did(shape):
    model = _in_process_pyfunc()
    n, h, w = shape
    images = np.random.default_rng(h * w).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    probs = model.predict(None, images)[["prob_a", "prob_b", "prob_c"]].to_numpy()
    np.testing.assert_allclose(probs, _old_path_probabilities(model.classifier, images), rtol=1e-4, atol=1e-6)


def test_pyfunc_splits_large_images_into_batches_by_pixel_count(monkeypatch):
    from pipeline.track import serving

    assert serving.predict_batch_rows(4000, 3000) == 1 and serving.predict_batch_rows(32, 32) == serving.PREDICT_BATCH
    model = _in_process_pyfunc()
    batches = []
    model.classifier.net.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    monkeypatch.setattr(serving, "PREDICT_PIXELS", 3 * 64 * 48)  # three 64 x 48 images per forward pass
    out = model.predict(None, np.zeros((7, 64, 48, 3), np.uint8))
    assert batches == [3, 3, 1] and len(out) == 7
    batches.clear()
    model.predict(None, np.zeros((7, 8, 8, 3), np.uint8))  # small images: one pass (at most PREDICT_BATCH)
    assert batches == [7]


def _hand_logits(run_id: str, images: np.ndarray) -> tuple[np.ndarray, dict]:
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model"))
    meta = json.loads((folder / "artifacts" / "model_meta.json").read_text())
    net = create_model(meta["arch"], meta["num_classes"])
    net.load_state_dict(torch.load(folder / "artifacts" / "state_dict.pt", weights_only=True))
    x = (images.astype(np.float32) / 255 - MEAN) / STD
    with torch.no_grad():
        return net.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).double().numpy(), meta


def test_served_probabilities_are_the_softmax_of_logits_over_the_stored_temperature(trained, test_split):
    from scipy.special import softmax

    test, class_names = test_split
    logits, meta = _hand_logits(trained.finetune, test.images)
    assert meta["temperature"] > 0  # calibrate defaults to true
    out = mlflow.pyfunc.load_model(f"runs:/{trained.finetune}/model").predict(test.images)
    probs = out[[f"prob_{c}" for c in class_names]].to_numpy()
    np.testing.assert_allclose(probs, softmax(logits / meta["temperature"], axis=1), atol=1e-4)
    assert (probs.argmax(1) == logits.argmax(1)).mean() > 0.99  # one scalar: the argmax stays


def test_a_model_without_a_temperature_serves_the_plain_softmax(trained, test_split, tmp_path):
    from types import SimpleNamespace

    from scipy.special import softmax

    from pipeline.track.serving import META_ARTIFACT, WEIGHTS_ARTIFACT, ImageClassifierModel

    test, _ = test_split
    logits, meta = _hand_logits(trained.finetune, test.images)
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{trained.finetune}/model")) / "artifacts"
    old_meta = tmp_path / "model_meta.json"
    old_meta.write_text(json.dumps({k: v for k, v in meta.items() if k != "temperature"}))  # as logged before
    model = ImageClassifierModel()
    model.load_context(SimpleNamespace(artifacts={META_ARTIFACT: str(old_meta),
                                                  WEIGHTS_ARTIFACT: str(folder / "state_dict.pt")}))
    out = model.predict(None, test.images)
    np.testing.assert_allclose(out.filter(like="prob_").to_numpy(), softmax(logits, axis=1), atol=1e-4)


def test_trial_models_from_one_saved_folder_load_and_predict_their_own_weights(experiment):
    """Tuning trials log their models without an input example, from a pyfunc folder saved once per
    process (pipeline.track.pyfunc_template): each is still a pyfunc model of its own, with its own weights."""
    from pipeline.model.models import ImageClassifier
    from pipeline.track import tracking
    from pipeline.track.references import load_model_ref

    names = ["cat", "dog", "emu"]
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    meta = {"arch": "resnet18", "num_classes": 3, "class_names": names, "image_size": 8, "dropout": 0.0,
            "temperature": None}
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = create_model("resnet18", 3)
        with mlflow.start_run() as run:
            tracking.log_model(ImageClassifier(net, names, 8), meta, images[:2], with_example=False)
        runs.append((run.info.run_id, {k: v.clone() for k, v in net.state_dict().items()}))
    for run_id, weights in runs:
        model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
        assert model.metadata.run_id == run_id
        assert set(model.predict(images)["class_name"]) <= set(names)
        state, loaded_meta = load_model_ref(run_id)
        assert loaded_meta["class_names"] == names
        assert all(torch.equal(state[k], weights[k]) for k in weights)
