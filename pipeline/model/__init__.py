"""The network and where it runs: architectures and the logged-net builder (models), device,
autocast and batched prediction (device), the CPU autocast choice by measurement (precision).

May import: pipeline.data, pipeline.config and the shared top-level modules (errors, distributed);
torch, never mlflow or optuna.
"""
