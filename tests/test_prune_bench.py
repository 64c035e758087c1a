"""benchmarks.prune_bench (issue 15's target in `make bench`): the tiny bench runs on the real archive and
emits its record; without the archive it says why; benchmarks.run wires it in and --skip-prune leaves it out."""

from __future__ import annotations

import json

import pytest

import benchmarks.overhead
from benchmarks import prune_bench
from tests.conftest import SHARED_ARCHIVE

SIDE_KEYS = {"params", "macs", "size_bytes", "img_per_s_b1", "img_per_s_b64", "test_accuracy", "trained"}
RATIO_KEYS = {"macs_reduction", "params_reduction", "speedup_b1", "speedup_b64", "accuracy_drop_points"}
CRITERIA = {"macs_reduction", "accuracy_drop", "speedup_b1", "speedup_b64", "all"}


def _records(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


@pytest.mark.skipif(not SHARED_ARCHIVE.exists(), reason=f"the shared CIFAR-10 JPEG archive is not at {SHARED_ARCHIVE}")
def test_the_tiny_prune_bench_emits_parent_and_pruned_side_by_side(capsys):
    prune_bench.main(["--tiny", "--archive", str(SHARED_ARCHIVE)])  # ~5 s on 2 cores: 60 images at 16 px
    (rec,) = _records(capsys)
    assert rec["bench"] == "prune" and not rec.get("skipped")
    assert SIDE_KEYS <= rec["parent"].keys() and SIDE_KEYS <= rec["pruned"].keys()
    assert RATIO_KEYS <= rec.keys() and set(rec["target_met"]) == CRITERIA
    assert rec["pruned"]["macs"] < rec["parent"]["macs"] and rec["macs_reduction"] > 3  # ratio 0.5: ~4x
    assert rec["pruned"]["trained"]["total_epochs"] == rec["parent"]["trained"]["epochs"] + 1
    assert rec["train_images"] == 60 and rec["test_images"] == 20 and rec["wall_s"] > 0
    assert "loadavg_1m_start" in rec and rec["settings"]["image_size"] == 16


def test_without_the_archive_the_prune_bench_says_it_skipped_and_why(tmp_path):
    missing = tmp_path / "no-archive.tar.gz"
    rec = prune_bench.run_prune_bench(prune_bench.tiny_settings(str(missing)))
    assert rec["bench"] == "prune" and rec["skipped"] is True and str(missing) in rec["reason"]


@pytest.mark.parametrize("skip", [False, True])
def test_make_bench_emits_the_prune_record_unless_skipped(skip, tmp_path, monkeypatch, capsys):
    """benchmarks.run's wiring (the archive absent, so the call is instant); its store stays this session's."""
    import benchmarks.run as run

    monkeypatch.setattr(benchmarks.overhead, "temporary_tracking_store", lambda: str(tmp_path))
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path))
    argv = ["--tiny", "--skip-throughput", "--skip-overhead", "--skip-recipe", "--archive",
            str(tmp_path / "absent.tar.gz")]
    run.main(argv + ["--skip-prune"] * skip)
    benches = [r.get("bench") for r in _records(capsys)]
    assert benches == ["system", "total"] if skip else benches == ["system", "prune", "total"]
