import io
import tarfile
import zipfile

import numpy as np
import pytest

from pipeline.data.sources import read_image_tree, resize_images
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
        read_image_tree(str(tmp_path / "one"), 8)


def test_non_images_are_skipped_and_counted_or_fail(image_folder):
    (image_folder / "red" / "notes.txt").write_text("not an image")
    src = read_image_tree(str(image_folder), 8, on_bad_image="skip")
    assert len(src.splits["train"]) == 18
    assert src.skipped_files == ["red/notes.txt"]
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
