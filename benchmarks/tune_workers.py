"""Wall time of one study run by 1 worker and by N workers on the same trials.

    python -m benchmarks.tune_workers --storage postgresql://pipeline:pipeline@127.0.0.1:5432/pipeline

Each case gets a fresh database on that server (or a fresh SQLite file with --storage sqlite) and
its own MLflow store; the trials are the same (random sampler, fixed seed, no pruning), so the
cases differ only in how many `python -m steps.tune` processes share the study. Every worker gets
cores/N intra-op threads, so 1 worker and N workers use the same cores. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prepare_inputs(folder: Path, image_size: int) -> dict:
    """A 10-class digits dataset and a model pretrained on it, as local folders."""
    import mlflow

    from pipeline.config import PrepareConfig, TrainConfig
    from pipeline.run.runners import run_prepare, run_train

    mlflow.set_tracking_uri(f"sqlite:///{folder}/inputs.db")
    data = run_prepare(PrepareConfig(source="digits", image_size=image_size))
    pre = run_train(
        TrainConfig(data=data, epochs=2, lr=0.05, batch_size=64, augment="none", device="cpu", system_metrics=False),
        "pretrain",
    )
    return {
        "data": mlflow.artifacts.download_artifacts(f"runs:/{data}/dataset", dst_path=str(folder / "data")),
        "pretrained": mlflow.artifacts.download_artifacts(f"runs:/{pre}/model", dst_path=str(folder / "pretrained")),
    }


@contextlib.contextmanager
def fresh_storage(storage: str, folder: Path):
    if storage == "sqlite":
        yield f"sqlite:///{folder}/optuna-{uuid.uuid4().hex[:8]}.db"
        return
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(storage, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
        try:
            yield storage.rsplit("/", 1)[0] + f"/{name}"
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def run_case(workers: int, inputs: dict, storage: str, folder: Path, args) -> dict:
    threads = max(1, (os.cpu_count() or 1) // workers)
    store = folder / f"mlflow-{workers}.db"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{store}",
        "MLFLOW_EXPERIMENT_NAME": f"bench-{workers}",
        "OMP_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    subprocess.run(
        [sys.executable, "-m", "mlflow", "experiments", "create", "-n", f"bench-{workers}"],
        env=env,
        check=True,
        capture_output=True,
    )  # one process creates the store's tables and the experiment
    cmd = [
        sys.executable,
        "-m",
        "steps.tune",
        "--data",
        inputs["data"],
        "--pretrained",
        inputs["pretrained"],
        "--study-name",
        "bench",
        "--storage",
        storage,
        "--n-trials",
        str(args.trials),
        "--epochs",
        str(args.epochs),
        "--sampler",
        "random",
        "--pruner",
        "none",
        "--seed",
        "0",
        "--batch-sizes",
        "32,64",
        "--augment",
        "none",
        "--device",
        "cpu",
        "--heartbeat",
        "10",
    ]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(workers)
    ]
    outputs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - start
    if any(p.returncode for p in procs):
        raise SystemExit("a worker failed:\n" + "\n".join(outputs))
    import optuna

    study = optuna.load_study(study_name="bench", storage=storage)
    finished = sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    return {
        "bench": "tune_workers",
        "workers": workers,
        "threads_per_worker": threads,
        "trials": finished,
        "epochs": args.epochs,
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--storage",
        default=os.environ.get("PIPELINE_TEST_POSTGRES", "sqlite"),
        help="a postgresql:// URL of a role that may create databases, or 'sqlite'",
    )
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--trials", type=int, default=9)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inputs = prepare_inputs(folder, args.image_size)
        results = []
        for workers in (1, args.workers):
            with fresh_storage(args.storage, folder) as storage:
                results.append(run_case(workers, inputs, storage, folder, args))
                print(json.dumps(results[-1]), flush=True)
        print(
            json.dumps(
                {
                    "bench": "tune_workers_speedup",
                    "workers": args.workers,
                    "ratio": round(results[0]["wall_s"] / results[1]["wall_s"], 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
