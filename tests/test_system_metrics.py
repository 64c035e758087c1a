"""Training runs log MLflow's system/* metrics unless system_metrics=false."""

import mlflow
import pytest

from pipeline.config import TrainConfig
from pipeline.run.runners import run_train

CPU = "system/cpu_utilization_percentage"


def _system_metrics(run_id: str) -> set[str]:
    return {k for k in mlflow.get_run(run_id).data.metrics if k.startswith("system/")}


@pytest.mark.parametrize("on", [True, False])
def test_training_run_logs_system_metrics_unless_switched_off(trained, experiment, monkeypatch, on):
    # A point is logged after each sampling interval; the tiny run lasts about a second.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    # The switch beats MLflow's global default in both directions.
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false" if on else "true")
    cfg = TrainConfig(data=trained.prepare, pretrained=trained.pretrain, arch="auto", frozen_layers=5, epochs=1,
                      batch_size=256, augment="none", precision="fp32", device="cpu", system_metrics=on)
    run_id = run_train(cfg, "finetune")
    assert mlflow.get_run(run_id).data.params["system_metrics"] == str(on).lower()
    if on:
        assert {CPU, "system/system_memory_usage_megabytes"} <= _system_metrics(run_id)
    else:
        assert _system_metrics(run_id) == set()
