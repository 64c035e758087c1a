"""Benchmarks: the pipeline's training loop against the classic one, and tracking/tuning overhead.

`make bench` (= `python -m benchmarks.run`) prints one JSON line per measurement.
"""
