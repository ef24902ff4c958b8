"""Tests of the image-folder dataset and resizing (image files: tests/utils/test_images.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hessdiff.eval import ImageFolderDataset, ImageItem, list_image_files, resize_image
from hessdiff.utils.images import to_uint8


def _array(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _write(path, arr: np.ndarray, **save_kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **save_kw)


@pytest.fixture()
def ffhq_like(tmp_path):
    """Flat FFHQ-style folder (written out of order), images of odd size 37x31 (HxW)."""
    root = tmp_path / "ffhq"
    arrays = {}
    for i in (3, 0, 10, 1, 2):
        arrays[f"{i:05d}.png"] = _array(i, 37, 31)
        _write(root / f"{i:05d}.png", arrays[f"{i:05d}.png"])
    (root / "LICENSE.txt").write_text("not an image")
    return root, arrays


def test_sorted_order_items_and_seeds(ffhq_like):
    root, arrays = ffhq_like
    ds = ImageFolderDataset(root, base_seed=100)
    assert len(ds) == 5 and ds.num_skipped == 0
    names = [ds[i].filename for i in range(len(ds))]
    assert names == ["00000.png", "00001.png", "00002.png", "00003.png", "00010.png"]
    item = ds[2]
    assert isinstance(item, ImageItem) and item.index == 2 and item.seed == 102
    assert item.image.dtype == torch.float32 and item.image.shape == (3, 37, 31)
    assert item.image.min() >= -1 and item.image.max() <= 1
    # native resolution: the pixels are the file's, exactly
    assert torch.equal(to_uint8(item.image), torch.from_numpy(arrays["00002.png"]).permute(2, 0, 1))
    assert torch.equal(ds.load_uint8(2), to_uint8(item.image))
    first = ImageFolderDataset(root, first_n=2)
    assert [first[i].filename for i in range(2)] == ["00000.png", "00001.png"]
    with pytest.raises(ValueError, match="only 5 readable"):
        ImageFolderDataset(root, first_n=6)


def test_resize_to_model_resolution_and_batching(ffhq_like):
    root, arrays = ffhq_like
    ds = ImageFolderDataset(root, 16)
    expected = resize_image(Image.fromarray(arrays["00000.png"]), 16, "center-crop")
    assert torch.equal(ds.load_uint8(0), torch.from_numpy(np.array(expected)).permute(2, 0, 1))
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    batch = next(iter(loader))
    assert batch.image.shape == (3, 3, 16, 16) and batch.seed.tolist() == [0, 1, 2]
    assert list(batch.filename) == ["00000.png", "00001.png", "00002.png"]
    rect = ImageFolderDataset(root, (8, 12), resize="resize-short-side")
    assert rect[0].image.shape == (3, 8, 12)
    with pytest.raises(ValueError, match="resize='none'"):
        ImageFolderDataset(root, 16, resize="none")[0]
    with pytest.raises(ValueError, match="unknown resize mode"):
        ImageFolderDataset(root, 16, resize="stretch")


def test_center_crop_is_crop_then_bicubic():
    arr = _array(5, 20, 40)  # wide image: crop the central 20x20 box, then resize
    img = Image.fromarray(arr)
    got = np.asarray(resize_image(img, 10, "center-crop"))
    manual = np.asarray(img.crop((10, 0, 30, 20)).resize((10, 10), Image.BICUBIC))
    assert np.array_equal(got, manual)
    tall = np.asarray(resize_image(Image.fromarray(arr.transpose(1, 0, 2)), 10, "center-crop"))
    assert np.array_equal(tall, np.asarray(Image.fromarray(arr.transpose(1, 0, 2)).crop((0, 10, 20, 30)).resize(
        (10, 10), Image.BICUBIC)))
    short = np.asarray(resize_image(img, 10, "resize-short-side"))  # 20x40 -> 10x20, centre 10x10
    assert np.array_equal(short, np.asarray(img.resize((20, 10), Image.BICUBIC))[:, 5:15])
    assert np.array_equal(np.asarray(resize_image(img, (20, 40))), arr)  # already the target size


def test_nested_ffhq_and_imagenet_layouts(tmp_path):
    ffhq = tmp_path / "ffhq"
    for i in (1000, 0, 1001, 1):
        _write(ffhq / f"{i // 1000 * 1000:05d}" / f"{i:05d}.png", _array(i, 8, 8))
    ds = ImageFolderDataset(ffhq)
    assert [ds.relative_name(i) for i in range(4)] == [
        "00000/00000.png", "00000/00001.png", "01000/01000.png", "01000/01001.png"]
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderDataset(ffhq, recursive=False)
    imagenet = tmp_path / "val"
    for idx, cls in ((3, "n02"), (1, "n09"), (2, "n01")):
        _write(imagenet / cls / f"ILSVRC2012_val_{idx:08d}.JPEG", _array(idx, 10, 12), format="JPEG")
    by_name = ImageFolderDataset(imagenet, 8, order="name")
    assert [by_name[i].filename for i in range(3)] == [
        "n09/ILSVRC2012_val_00000001.JPEG", "n01/ILSVRC2012_val_00000002.JPEG", "n02/ILSVRC2012_val_00000003.JPEG"]
    by_path = list_image_files(imagenet)
    assert [p.parent.name for p in by_path] == ["n01", "n02", "n09"]


def test_explicit_file_list(ffhq_like):
    root, _ = ffhq_like
    ds = ImageFolderDataset(root, files=["00010.png", root / "00001.png"], base_seed=7)
    assert [ds[i].filename for i in range(2)] == ["00010.png", "00001.png"] and ds[1].seed == 8
    with pytest.raises(FileNotFoundError, match="99999.png"):
        ImageFolderDataset(root, files=["00000.png", "99999.png"])


def test_empty_and_missing_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"no image files found in {empty}"):
        ImageFolderDataset(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    root = tmp_path / "mixed"
    for i in (0, 2, 4):
        _write(root / f"{i:05d}.png", _array(i, 12, 12))
    (root / "00001.png").write_bytes(b"this is not a png")
    (root / "00003.jpg").write_bytes(b"")
    good = (root / "00000.png").read_bytes()
    (root / "00005.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.warns(UserWarning, match="skipped 3 unreadable"):
        ds = ImageFolderDataset(root)
    assert len(ds) == 3 and ds.num_skipped == 3
    assert sorted(p.name for p, _ in ds.skipped) == ["00001.png", "00003.jpg", "00005.png"]
    assert [ds[i].filename for i in range(3)] == ["00000.png", "00002.png", "00004.png"]
    assert [ds[i].seed for i in range(3)] == [0, 1, 2]
    # first_n counts readable images and stops scanning once it has them
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        two = ImageFolderDataset(root, first_n=2)
    assert [two[i].filename for i in range(2)] == ["00000.png", "00002.png"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no readable image"):
        ImageFolderDataset(bad)
