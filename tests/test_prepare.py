import json

import numpy as np
import pytest

from pipeline.config import PrepareConfig
from pipeline.data.imageset import ImageSet
from pipeline.data.prepare import split_source
from pipeline.data.sources import SourceImages, load_digits
from pipeline.data.store import load_dataset, save_dataset
from pipeline.errors import PipelineError


def _source(per_class=(50, 30, 20), with_test=False):
    labels = np.concatenate([np.full(n, i, np.int64) for i, n in enumerate(per_class)])
    images = np.random.default_rng(0).integers(0, 255, (len(labels), 8, 8, 3), dtype=np.uint8)
    splits = {"train": ImageSet(images, labels)}
    if with_test:
        splits["test"] = ImageSet(images[:9], labels[:9])
    return SourceImages(["a", "b", "c"], splits, [])


def test_val_and_test_are_carved_stratified_and_disjoint():
    ds = split_source(_source(), PrepareConfig(source="x", val_fraction=0.2, test_fraction=0.1))
    counts = {k: np.bincount(v.labels, minlength=3).tolist() for k, v in ds.splits.items()}
    assert counts["test"] == [5, 3, 2]  # 10% of each class
    assert sum(counts["val"]) == 18 and counts["val"][0] > counts["val"][2]
    assert sum(map(sum, counts.values())) == 100
    rows = [ds.splits[k].images.reshape(len(ds.splits[k]), -1) for k in ("train", "val", "test")]
    seen = {r.tobytes() for r in rows[0]}
    assert not any(r.tobytes() in seen for r in np.concatenate(rows[1:]))


def test_source_test_split_is_kept_and_test_fraction_ignored():
    ds = split_source(_source(with_test=True), PrepareConfig(source="x", test_fraction=0.5))
    assert len(ds.splits["test"]) == 9


def test_class_subset_and_samples_per_class():
    ds = split_source(_source(), PrepareConfig(source="x", classes="c,a", samples_per_class=7))
    assert ds.class_names == ["a", "c"]  # source order is kept
    assert np.bincount(ds.splits["train"].labels).tolist() == [7, 7]
    assert set(np.unique(ds.splits["val"].labels)) == {0, 1}
    with pytest.raises(PipelineError, match="classes zebra not in the source; available: a, b, c"):
        split_source(_source(), PrepareConfig(source="x", classes="a,zebra"))


def test_same_seed_same_split_other_seed_other_split():
    a = split_source(_source(), PrepareConfig(source="x", seed=1))
    b = split_source(_source(), PrepareConfig(source="x", seed=1))
    c = split_source(_source(), PrepareConfig(source="x", seed=2))
    assert np.array_equal(a.splits["val"].images, b.splits["val"].images)
    assert not np.array_equal(a.splits["val"].images, c.splits["val"].images)


def test_digits_source_is_rgb_and_upscaled():
    src = load_digits(32)
    assert src.splits["train"].images.shape == (1797, 32, 32, 3)
    assert src.class_names == [str(i) for i in range(10)]


def test_store_round_trip_and_sha256_check(tmp_path):
    ds = split_source(_source(), PrepareConfig(source="x"))
    manifest = save_dataset(ds, str(tmp_path), {"source": "x", "seed": 0})
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["counts"]["train"] == np.bincount(ds.splits["train"].labels, minlength=3).tolist()
    assert set(on_disk["sha256"]) == {f"{s}_{k}.npy" for s in ("train", "val", "test") for k in ("images", "labels")}
    loaded, _ = load_dataset(str(tmp_path))
    assert np.array_equal(loaded.splits["val"].images, ds.splits["val"].images)
    assert manifest["digest"] == on_disk["digest"]
    # Flip one byte of the stored training images: loading must refuse it.
    path = tmp_path / "train_images.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(PipelineError, match="train_images.npy .* does not match its manifest sha256"):
        load_dataset(str(tmp_path))


def test_a_folder_without_manifest_is_not_a_dataset(tmp_path):
    with pytest.raises(PipelineError, match="not a dataset artifact"):
        load_dataset(str(tmp_path))


def test_max_image_pixels_defaults_to_pils_refusal_threshold_and_is_validated():
    from PIL import Image

    from pipeline.config import EvaluateConfig

    assert PrepareConfig().max_image_pixels == 2 * Image.MAX_IMAGE_PIXELS == 178956970
    assert EvaluateConfig(model="m", data="d").max_image_pixels == 178956970
    for bad in (-1, 1.5):
        with pytest.raises(PipelineError, match=f"max_image_pixels={bad} must be an integer >= 0"):
            PrepareConfig(max_image_pixels=bad)
        with pytest.raises(PipelineError, match=f"max_image_pixels={bad} must be an integer >= 0"):
            EvaluateConfig(model="m", data="d", max_image_pixels=bad)


AWKWARD_CLASSES = ["bird (small)", "it's \"quoted\"", "a+b & c#d%e,f;g", "7 up", "猫", "кошка", "n" * 150]


def test_prepare_keeps_awkward_class_names_exactly(tmp_path):
    from pipeline.data.prepare import prepare_dataset
    from tests.conftest import write_image

    for i, cls in enumerate(AWKWARD_CLASSES):
        for j in range(10):
            write_image(tmp_path / "d" / cls / f"{j}.png", (i * 30, j * 20, 0), size=(9, 9))
    ds, skipped = prepare_dataset(PrepareConfig(source=str(tmp_path / "d"), image_size=8, val_fraction=0.2))
    assert ds.class_names == sorted(AWKWARD_CLASSES) and skipped == []
    assert np.bincount(ds.splits["test"].labels).tolist() == [1] * len(AWKWARD_CLASSES)


def test_folder_class_subset_is_checked_before_any_image_is_decoded(tmp_path, monkeypatch):
    import pipeline.data.tree as tree
    from pipeline.data.prepare import prepare_dataset
    from tests.conftest import write_image

    decoded = []
    monkeypatch.setattr(tree, "decode_image", lambda *args: decoded.append(args))
    for cls in ("a", "b"):
        write_image(tmp_path / "d" / cls / "0.png", (1, 1, 1))
    with pytest.raises(PipelineError, match="classes zebra not in the source; available: a, b"):
        prepare_dataset(PrepareConfig(source=str(tmp_path / "d"), classes="a,zebra"))
    write_image(tmp_path / "t" / "test" / "a" / "0.png", (1, 1, 1))
    with pytest.raises(PipelineError, match="has no train/ split"):
        prepare_dataset(PrepareConfig(source=str(tmp_path / "t")))
    assert decoded == []
