import io
import shutil
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from pipeline.data.sources import (
    choose_split,
    decode_tree,
    load_source,
    read_image_tree,
    resize_images,
    scan_image_tree,
)
from pipeline.errors import PipelineError
from tests.conftest import write_image


def test_image_folder_is_decoded_resized_and_labelled(image_folder):
    src = read_image_tree(str(image_folder), 8)
    assert src.class_names == ["blue", "green", "red"]
    train = src.splits["train"]
    assert train.images.shape == (18, 8, 8, 3) and train.images.dtype == np.uint8
    assert np.bincount(train.labels).tolist() == [6, 6, 6]
    # Every red image is red after resizing: labels follow the folders.
    red = train.images[train.labels == 2]
    assert (red[..., 0] > 200).all() and (red[..., 2] < 40).all()


def test_train_and_test_folders_are_honoured_as_splits(tmp_path):
    for split, n in (("train", 4), ("test", 2)):
        for cls, color in (("a", (0, 0, 0)), ("b", (255, 255, 255))):
            for i in range(n):
                write_image(tmp_path / "ds" / split / cls / f"{i}.png", color)
    src = read_image_tree(str(tmp_path / "ds"), 8)
    assert len(src.splits["train"]) == 8 and len(src.splits["test"]) == 4
    assert src.class_names == ["a", "b"]


def _tar_of(folder, out, wrapper="mydata"):
    with tarfile.open(out, "w:gz") as tf:
        tf.add(folder, arcname=wrapper)
    return out


def test_tar_and_zip_archives_read_like_folders(image_folder, tmp_path):
    tar = _tar_of(image_folder, tmp_path / "d.tar.gz")
    zpath = tmp_path / "d.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(image_folder.rglob("*.png")):
            zf.write(p, p.relative_to(image_folder))
    for archive in (tar, zpath):
        src = read_image_tree(str(archive), 8)
        assert src.class_names == ["blue", "green", "red"]
        assert len(src.splits["train"]) == 18


def _tar_with_member(path, name, linkname=None):
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("ok/a/1.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
        bad = tarfile.TarInfo(name)
        if linkname:
            bad.type, bad.linkname = tarfile.SYMTYPE, linkname
            tf.addfile(bad)
        else:
            bad.size = 1
            tf.addfile(bad, io.BytesIO(b"x"))
    return str(path)


@pytest.mark.parametrize(
    "name, link, fragment",
    [
        ("../evil.png", None, "escapes the target folder"),
        ("/etc/evil.png", None, "escapes the target folder"),
        ("ok/b/link.png", "/etc/passwd", "links are refused"),
    ],
)
def test_archive_members_escaping_the_folder_are_refused(tmp_path, name, link, fragment):
    archive = _tar_with_member(tmp_path / "bad.tar", name, link)
    with pytest.raises(PipelineError) as info:
        read_image_tree(archive, 8)
    assert fragment in str(info.value)
    assert not (tmp_path.parent / "evil.png").exists()


def test_zip_slip_is_refused(tmp_path):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("../../evil.png", b"x")
    with pytest.raises(PipelineError, match="escapes the target folder"):
        read_image_tree(str(path), 8)


def test_truncated_and_fake_archives_get_a_clear_error(image_folder, tmp_path):
    tar = _tar_of(image_folder, tmp_path / "d.tar.gz")
    data = tar.read_bytes()
    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(data[: len(data) // 2])
    fake = tmp_path / "fake.tar.gz"
    fake.write_bytes(b"this is not an archive")
    for path in (truncated, fake):
        with pytest.raises(PipelineError, match="truncated or not a valid archive"):
            read_image_tree(str(path), 8)


def test_missing_source_and_non_archive_file(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        read_image_tree(str(tmp_path / "nope"), 8)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(PipelineError, match="not a .tar, .tar.gz, .tgz or .zip archive"):
        read_image_tree(str(tmp_path / "notes.txt"), 8)


def test_folder_without_class_folders_or_with_one_class(tmp_path):
    write_image(tmp_path / "flat" / "1.png", (1, 2, 3))
    with pytest.raises(PipelineError, match="has no class subfolders"):
        read_image_tree(str(tmp_path / "flat"), 8)
    write_image(tmp_path / "one" / "cat" / "1.png", (1, 2, 3))
    write_image(tmp_path / "one" / "cat" / "2.png", (1, 2, 3))
    with pytest.raises(PipelineError, match="only one class folder"):
        load_source(str(tmp_path / "one"), "", 8)


def test_non_images_are_skipped_and_counted_or_fail(image_folder):
    (image_folder / "red" / "notes.txt").write_text("not an image")
    src = read_image_tree(str(image_folder), 8, on_bad_image="skip")
    assert len(src.splits["train"]) == 18
    assert src.skipped_files == ["red/notes.txt: not an image format PIL can read"]
    with pytest.raises(PipelineError, match="red/notes.txt .* is not a readable image"):
        read_image_tree(str(image_folder), 8, on_bad_image="fail")


def test_resize_images_keeps_constant_colour():
    img = np.full((2, 8, 8, 3), 77, np.uint8)
    out = resize_images(img, 16)
    assert out.shape == (2, 16, 16, 3) and (out == 77).all()


def test_cifar10_offline_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.utils as tv_utils

    from pipeline.data.sources import load_cifar10

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    with pytest.raises(PipelineError) as info:
        load_cifar10(str(tmp_path / "cifar"), 32)
    message = str(info.value)
    assert "could not download CIFAR-10" in message
    assert "copy cifar-10-python.tar.gz into" in message and "set source to a local image folder or archive" in message
    assert "\n" not in message


# Layouts users have, in folders and archives, with and without a wrapper folder.
COLORS = {"airplane": (250, 10, 10), "bird (small)": (10, 250, 10)}
LAYOUTS = {
    "plain": (None,),
    "train+test": ("train", "test"),
    "train+val+test": ("train", "val", "test"),
    "test only": ("test",),
    "val+test": ("val", "test"),
    "train only": ("train",),
}


def _write_tree(root, splits):
    """2 classes x (2 images per split); clutter at the root and in a class folder."""
    for split in splits:
        base = root if split is None else root / split
        for cls, color in COLORS.items():
            for i in range(2):
                write_image(base / cls / f"{i}.png", color, size=(6, 5))
        (base / "airplane" / "Thumbs.db").write_bytes(b"\x00" * 10)
    (root / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "README.md").write_text("my data")


def _package(tmp_path, root, container):
    if container == "folder":
        return root
    if container == "wrapped folder":
        outer = tmp_path / "outer"
        shutil.copytree(root, outer / "mydata")
        return outer
    if container == "tar.gz with wrapper":
        path = tmp_path / "d.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            tf.add(root, arcname="mydata")
        return path
    path = tmp_path / "d.zip"  # zip without wrapper, with macOS resource forks
    with zipfile.ZipFile(path, "w") as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(root))
                zf.writestr(f"__MACOSX/{p.relative_to(root).parent}/._{p.name}", b"\x00")
    return path


@pytest.mark.parametrize("container", ["folder", "wrapped folder", "tar.gz with wrapper", "zip"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_alike_in_every_container(tmp_path, layout, container):
    root = tmp_path / "tree"
    _write_tree(root, LAYOUTS[layout])
    tree = scan_image_tree(str(_package(tmp_path, root, container)))
    expected_splits = ["train"] if layout == "plain" else [s for s in ("train", "val", "test") if s in LAYOUTS[layout]]
    assert tree.split_names == expected_splits
    assert tree.class_names == ["airplane", "bird (small)"]
    src = decode_tree(tree, 8)
    for split in expected_splits:
        s = src.splits[split]
        assert np.bincount(s.labels).tolist() == [2, 2]
        assert (s.images[s.labels == 1][..., 1] > 200).all()  # labels follow the folders
    # Thumbs.db, .DS_Store and __MACOSX are ignored; only the README is listed, with why.
    assert src.skipped_files == ["README.md: outside any class folder"]


def test_evaluate_on_an_archive_holding_only_test_class_folders(tmp_path):
    """issue 13: `test/<class>/<img>` (CIFAR-10's image dumps) failed with 'has no class subfolders'."""
    root = tmp_path / "tree"
    _write_tree(root, ("test",))
    archive = _package(tmp_path, root, "tar.gz with wrapper")
    tree = scan_image_tree(str(archive))
    for wanted in ("test", "val", "train"):  # the only split is scored whatever was asked
        assert choose_split(tree, wanted) == "test"
    src = decode_tree(tree, 8, splits=("test",))
    assert set(src.splits) == {"test"} and len(src.splits["test"]) == 4


def test_choose_split_prefers_the_wanted_split_and_names_those_found(tmp_path):
    _write_tree(tmp_path / "tree", ("train", "test"))
    tree = scan_image_tree(str(tmp_path / "tree"))
    assert choose_split(tree, "train") == "train" and choose_split(tree, "test") == "test"
    with pytest.raises(PipelineError) as info:
        choose_split(tree, "val")
    where = repr(str(tmp_path / "tree"))
    assert str(info.value) == f"{where} has no val/ split; it has train/, test/: set split to one of train, test"


def test_decode_tree_decodes_only_the_splits_asked(tmp_path):
    _write_tree(tmp_path / "tree", ("train", "val", "test"))
    tree = scan_image_tree(str(tmp_path / "tree"))
    (tmp_path / "tree" / "train" / "airplane" / "0.png").write_bytes(b"")  # read already: no effect
    src = decode_tree(tree, 8, splits=("val",))
    assert set(src.splits) == {"val"}


@pytest.mark.parametrize("splits", [("test",), ("val", "test")])
def test_prepare_data_without_train_says_so_in_one_line(tmp_path, splits):
    _write_tree(tmp_path / "tree", splits)
    with pytest.raises(PipelineError) as info:
        load_source(str(tmp_path / "tree"), "", 8)
    message = str(info.value)
    found = ", ".join(s + "/" for s in splits)
    assert f"has no train/ split (it has {found}); prepare_data needs train/<class>/<image>" in message
    assert "\n" not in message


def test_a_class_named_like_a_split_beside_other_classes_is_a_class(tmp_path):
    for cls in ("test", "cat"):
        for i in range(2):
            write_image(tmp_path / "tree" / cls / f"{i}.png", (9, 9, 9))
    src = read_image_tree(str(tmp_path / "tree"), 8)
    assert src.class_names == ["cat", "test"] and list(src.splits) == ["train"]


def test_readme_beside_the_wrapper_is_listed_not_fatal(tmp_path):
    _write_tree(tmp_path / "outer" / "mydata", (None,))
    (tmp_path / "outer" / "LICENSE").write_text("cc-by")
    src = read_image_tree(str(tmp_path / "outer"), 8)
    assert src.class_names == ["airplane", "bird (small)"]
    assert sorted(src.skipped_files) == ["LICENSE: outside any class folder", "README.md: outside any class folder"]


def test_split_with_classes_unknown_to_train_is_refused_before_decoding(tmp_path):
    _write_tree(tmp_path / "tree", ("train",))
    write_image(tmp_path / "tree" / "test" / "zebra" / "0.png", (1, 1, 1))
    with pytest.raises(PipelineError, match="test/ in .* has classes not in train/: zebra"):
        scan_image_tree(str(tmp_path / "tree"))


# Image files users have: every kind that decodes keeps decoding; every failure costs one file.


def _png_claiming(path, width, height):
    """A tiny PNG whose header claims width x height pixels (no pixel data to back it)."""
    import struct
    import zlib as _zlib

    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of header fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", _zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


def _write_good_kinds(folder):
    """{file name: the RGB colour it must decode to}, for image kinds users keep."""
    folder.mkdir(parents=True)
    Image.new("RGBA", (9, 7), (10, 20, 30, 128)).save(folder / "rgba.png")
    Image.new("L", (9, 7), 90).save(folder / "grey.png")
    Image.fromarray(np.full((7, 9), 40000, np.uint16)).save(folder / "sixteen.png")  # 16-bit grey
    pal = Image.new("P", (9, 7), 0)
    pal.putpalette([200, 100, 50] * 256)
    pal.info["transparency"] = 0
    pal.save(folder / "palette.png")
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(folder / "cmyk.jpg", quality=95)
    Image.new("RGB", (9, 7), (30, 60, 90)).save(folder / "photo.webp", lossless=True)
    Image.new("RGB", (1, 1), (70, 80, 90)).save(folder / "one_pixel.png")
    Image.new("RGB", (3000, 2000), (120, 130, 140)).save(folder / "big.JPG", quality=95)
    Image.new("RGB", (9, 7), (5, 100, 5)).save(folder / "ñandú 猫 (1).png")
    Image.new("RGB", (16, 16), (50, 50, 200)).save(folder / "bad_exif.jpg", exif=b"Exif\x00\x00garbage!", quality=95)
    return {
        "rgba.png": (10, 20, 30), "grey.png": (90, 90, 90), "sixteen.png": (156, 156, 156),
        "palette.png": (200, 100, 50), "cmyk.jpg": (255, 255, 255), "photo.webp": (30, 60, 90),
        "one_pixel.png": (70, 80, 90), "big.JPG": (120, 130, 140), "ñandú 猫 (1).png": (5, 100, 5),
        "bad_exif.jpg": (50, 50, 200),
    }


def _write_bad_kinds(folder):
    """{file name: start of its skip reason}."""
    folder.mkdir(parents=True)
    (folder / "empty.png").write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG")
    (folder / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "notes.jpg").write_text("not an image")
    _png_claiming(folder / "huge.png", 20000, 10000)
    return {
        "empty.png": "empty file (0 bytes)",
        "cut.jpg": "OSError: image file is truncated",
        "notes.jpg": "not an image format PIL can read",
        "huge.png": "200000000 pixels over max_image_pixels=178956970",
    }


def test_image_kinds_users_keep_decode_to_their_colours(tmp_path):
    good = _write_good_kinds(tmp_path / "d" / "good")
    write_image(tmp_path / "d" / "other" / "0.png", (0, 0, 0))
    src = read_image_tree(str(tmp_path / "d"), 8)
    train = src.splits["train"]
    assert src.skipped_files == []
    images = train.images[train.labels == 0]
    for name, image in zip(sorted(good), images):  # files are read in sorted name order
        mean = image.reshape(-1, 3).mean(axis=0)
        assert np.abs(mean - good[name]).max() <= 3, (name, mean)


def test_unreadable_files_are_skipped_with_their_reason(tmp_path):
    bad = _write_bad_kinds(tmp_path / "d" / "bad")
    for cls in ("bad", "other"):
        write_image(tmp_path / "d" / cls / "0.png", (0, 0, 0))
    limit_before = Image.MAX_IMAGE_PIXELS
    src = read_image_tree(str(tmp_path / "d"), 8)
    assert np.bincount(src.splits["train"].labels).tolist() == [1, 1]
    reasons = dict(line.split(": ", 1) for line in src.skipped_files)
    assert set(reasons) == {f"bad/{name}" for name in bad}
    for name, start in bad.items():
        assert reasons[f"bad/{name}"].startswith(start), reasons
    assert Image.MAX_IMAGE_PIXELS == limit_before  # PIL's process-wide limit is left as it was


@pytest.mark.parametrize("kind", ["empty.png", "cut.jpg", "notes.jpg", "huge.png"])
def test_on_bad_image_fail_stops_at_the_file_in_one_line(tmp_path, kind):
    bad = _write_bad_kinds(tmp_path / "all")
    for cls in ("a", "b"):
        write_image(tmp_path / "d" / cls / "0.png", (0, 0, 0))
    shutil.copy(tmp_path / "all" / kind, tmp_path / "d" / "a" / kind)
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(PipelineError) as info:
        read_image_tree(str(tmp_path / "d"), 8, on_bad_image="fail")
    message = str(info.value)
    assert message.startswith(f"a/{kind} in ") and bad[kind] in message and "on_bad_image=skip" in message
    assert "\n" not in message
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_pixel_limit_is_a_parameter_and_zero_means_none(tmp_path):
    write_image(tmp_path / "d" / "a" / "0.png", (1, 1, 1), size=(64, 64))
    write_image(tmp_path / "d" / "b" / "0.png", (1, 1, 1), size=(10, 10))
    src = read_image_tree(str(tmp_path / "d"), 8, max_image_pixels=1000)
    assert src.skipped_files == ["a/0.png: 4096 pixels over max_image_pixels=1000"]
    assert len(read_image_tree(str(tmp_path / "d"), 8, max_image_pixels=0).splits["train"]) == 2


def test_our_limit_not_pils_decides_and_pils_is_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # as if PIL's own limit were low
    write_image(tmp_path / "d" / "a" / "0.png", (1, 1, 1), size=(64, 64))
    write_image(tmp_path / "d" / "b" / "0.png", (1, 1, 1), size=(10, 10))
    src = read_image_tree(str(tmp_path / "d"), 8, max_image_pixels=5000)
    assert src.skipped_files == [] and len(src.splits["train"]) == 2
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_over_the_limit_files_are_never_decoded(tmp_path, monkeypatch):
    from PIL import ImageFile

    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    write_image(tmp_path / "d" / "a" / "0.png", (1, 1, 1), size=(64, 64))
    write_image(tmp_path / "d" / "b" / "0.png", (1, 1, 1), size=(10, 10))
    read_image_tree(str(tmp_path / "d"), 8, max_image_pixels=1000)
    assert (64, 64) not in loads and (10, 10) in loads


@pytest.mark.parametrize(
    "exc", [SyntaxError("broken plugin"), IndexError("tuple index"), Image.DecompressionBombError("bomb"),
            Image.DecompressionBombWarning("bomb"), ZeroDivisionError("division by zero")],
)
def test_whatever_a_decoder_raises_costs_one_file(tmp_path, monkeypatch, exc):
    import pipeline.data.images as images

    real = images._to_rgb

    def flaky(im):
        if im.size == (13, 13):
            raise exc
        return real(im)

    monkeypatch.setattr(images, "_to_rgb", flaky)
    write_image(tmp_path / "d" / "a" / "odd.png", (1, 1, 1), size=(13, 13))
    write_image(tmp_path / "d" / "a" / "0.png", (1, 1, 1))
    write_image(tmp_path / "d" / "b" / "0.png", (1, 1, 1))
    src = read_image_tree(str(tmp_path / "d"), 8)
    assert src.skipped_files == [f"a/odd.png: {type(exc).__name__}: {exc}"]
    assert len(src.splits["train"]) == 2
