"""training/data/dataset.py: round trips through the official dataset format, subsets, flips, labels, errors."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from training.data.dataset import DatasetError, ImageFolderDataset, image_to_array, iter_image_files, parse_labels


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(path: str, images: list[np.ndarray], labels: list | None = None, as_zip: bool = False) -> list[str]:
    """Write images ([H, W, C] uint8) in the official layout, independently of dataset_tool.py."""
    names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(len(images))]
    files = {name: _png_bytes(image) for name, image in zip(names, images)}
    files["dataset.json"] = json.dumps({"labels": None if labels is None else [list(x) for x in zip(names, labels)]
                                        }).encode()
    if as_zip:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    else:
        for name, data in files.items():
            os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
            with open(os.path.join(path, name), "wb") as f:
                f.write(data)
    return names


def random_images(n: int, size: int = 8, channels: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("as_zip", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_pixels_and_class_labels(tmp_path, as_zip, channels):
    images = random_images(5, channels=channels)
    labels = [3, 0, 9, 3, 1]
    path = str(tmp_path / ("ds.zip" if as_zip else "ds"))
    write_dataset(path, images, labels, as_zip=as_zip)
    ds = ImageFolderDataset(path, resolution=8, use_labels=True)
    assert (ds.name, len(ds), ds.resolution, ds.num_channels) == ("ds", 5, 8, channels)
    assert ds.image_shape == [channels, 8, 8]
    assert (ds.label_shape, ds.label_dim, ds.has_labels) == ([10], 10, True)
    for i in range(5):
        image, label = ds[i]
        assert image.dtype == np.uint8 and label.dtype == np.float32
        np.testing.assert_array_equal(image, images[i].transpose(2, 0, 1))
        np.testing.assert_array_equal(label, np.eye(10, dtype=np.float32)[labels[i]])
        np.testing.assert_array_equal(ds.get_label(i), label)


def test_vector_labels_stay_float(tmp_path):
    vectors = [[0.5, -1.0, 2.0], [1.5, 0.0, 0.25]]
    write_dataset(str(tmp_path), random_images(2), vectors)
    ds = ImageFolderDataset(str(tmp_path), use_labels=True)
    assert (ds.label_shape, ds.label_dim) == ([3], 3)
    np.testing.assert_array_equal(ds[1][1], np.float32(vectors[1]))


@pytest.mark.parametrize("labels", [None, [1, 2, 0]])
def test_unlabelled_or_labels_not_used(tmp_path, labels):
    write_dataset(str(tmp_path), random_images(3), labels)
    ds = ImageFolderDataset(str(tmp_path), use_labels=labels is None)
    assert (ds.label_shape, ds.label_dim, ds.has_labels) == ([0], 0, False)
    assert ds[2][1].shape == (0,) and ds[2][1].dtype == np.float32


def test_max_size_keeps_seeded_sorted_subset(tmp_path):
    images = random_images(20)
    write_dataset(str(tmp_path), images)
    ds = ImageFolderDataset(str(tmp_path), max_size=7, random_seed=3)
    expected = np.arange(20)
    np.random.RandomState(3).shuffle(expected)
    expected = np.sort(expected[:7])
    assert len(ds) == 7
    assert [ds.get_details(i)["raw_idx"] for i in range(7)] == expected.tolist()
    np.testing.assert_array_equal(ds[6][0], images[expected[6]].transpose(2, 0, 1))
    other = ImageFolderDataset(str(tmp_path), max_size=7, random_seed=4)
    assert [other.get_details(i)["raw_idx"] for i in range(7)] != expected.tolist()
    assert len(ImageFolderDataset(str(tmp_path), max_size=50)) == 20


def test_xflip_appends_mirrored_copies(tmp_path):
    images = random_images(3)
    write_dataset(str(tmp_path), images, [0, 1, 2])
    ds = ImageFolderDataset(str(tmp_path), use_labels=True, xflip=True)
    assert len(ds) == 6
    for i in range(3):
        np.testing.assert_array_equal(ds[i][0], images[i].transpose(2, 0, 1))
        np.testing.assert_array_equal(ds[i + 3][0], images[i].transpose(2, 0, 1)[:, :, ::-1])
        np.testing.assert_array_equal(ds[i + 3][1], ds[i][1])


def test_cache_returns_same_pixels(tmp_path):
    images = random_images(2)
    write_dataset(str(tmp_path), images)
    ds = ImageFolderDataset(str(tmp_path), cache=True, xflip=True)
    first = ds[0][0]
    np.testing.assert_array_equal(ds[0][0], first)
    np.testing.assert_array_equal(ds[2][0], first[:, :, ::-1])


@pytest.mark.parametrize("max_size", [None, 5])
def test_cached_pixels_are_the_written_images_with_subsets_and_flips(tmp_path, max_size):
    """Every item, read twice (the second time from the cache), is the image that was written for its raw index
    (mirrored for the flipped copies), also when max_size picks a subset out of order."""
    images = random_images(9)
    write_dataset(str(tmp_path), images, list(range(9)))
    ds = ImageFolderDataset(str(tmp_path), use_labels=True, cache=True, xflip=True, max_size=max_size,
                            random_seed=3)
    for _ in range(2):
        for idx in range(len(ds)):
            image, label = ds[idx]
            raw_idx = int(label.argmax())  # Image i was written with label i.
            assert ds.get_details(idx)["raw_idx"] == raw_idx
            expected = images[raw_idx].transpose(2, 0, 1)
            np.testing.assert_array_equal(image, expected[:, :, ::-1] if idx >= len(ds) // 2 else expected)
    assert len(ds) == 2 * (max_size or 9)


def test_zip_dataset_in_dataloader_workers_and_pickle(tmp_path):
    images = random_images(12)
    path = str(tmp_path / "ds.zip")
    write_dataset(path, images, list(range(12)), as_zip=True)
    ds = ImageFolderDataset(path, use_labels=True)
    ds[0]  # opens the ZIP in this process before the workers fork
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[5][0], images[5].transpose(2, 0, 1))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    got = torch.cat([x for x, _ in loader]).numpy()
    np.testing.assert_array_equal(got, np.stack(images).transpose(0, 3, 1, 2))


def test_iter_image_files_sorted_and_filtered(tmp_path):
    for name in ["b/2.png", "a/10.jpg", "a/9.webp", "notes.txt", "dataset.json", ".hidden.png", "__MACOSX/x.png"]:
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert iter_image_files(str(tmp_path)) == ["a/10.jpg", "a/9.webp", "b/2.png"]
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as zf:
        for name in ["z.png", "y/a.PNG", "readme.md"]:
            zf.writestr(name, b"")
    assert iter_image_files(str(tmp_path / "x.zip")) == ["y/a.PNG", "z.png"]


def test_image_to_array_conversions():
    gray16 = PIL.Image.fromarray(np.array([[0, 257, 65535, 32896]], dtype=np.uint16))
    assert gray16.mode.startswith("I")
    np.testing.assert_array_equal(image_to_array(gray16)[..., 0], [[0, 1, 255, 128]])
    rgba = PIL.Image.fromarray(np.array([[[10, 20, 30, 0]]], dtype=np.uint8), "RGBA")
    np.testing.assert_array_equal(image_to_array(rgba), [[[10, 20, 30]]])
    palette = PIL.Image.fromarray(np.array([[1]], dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 200, 100, 50])
    np.testing.assert_array_equal(image_to_array(palette), [[[200, 100, 50]]])
    bilevel = PIL.Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
    np.testing.assert_array_equal(image_to_array(bilevel)[..., 0], [[0, 255]])
    gray_alpha = PIL.Image.fromarray(np.array([[[77, 3]]], dtype=np.uint8), "LA")
    assert image_to_array(gray_alpha).tolist() == [[[77]]]
    cmyk = PIL.Image.new("CMYK", (1, 1), (0, 0, 0, 0))
    assert image_to_array(cmyk).tolist() == [[[255, 255, 255]]]


# Errors: one line naming the file and the fix.


def test_missing_path(tmp_path):
    with pytest.raises(DatasetError, match=r"nothere\.zip: no such file.*dataset_tool\.py"):
        ImageFolderDataset(str(tmp_path / "nothere.zip"))


def test_empty_dataset(tmp_path):
    (tmp_path / "dataset.json").write_text('{"labels": null}')
    with pytest.raises(DatasetError, match="no image files found; convert"):
        ImageFolderDataset(str(tmp_path))


def test_corrupt_zip(tmp_path):
    path = tmp_path / "broken.zip"
    write_dataset(str(path), random_images(3), as_zip=True)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetError, match=r"broken\.zip: not a readable ZIP file .*re-create it"):
        ImageFolderDataset(str(path))


def test_corrupt_image(tmp_path):
    names = write_dataset(str(tmp_path), random_images(3))
    data = (tmp_path / names[1]).read_bytes()
    (tmp_path / names[1]).write_bytes(data[: len(data) // 2])
    ds = ImageFolderDataset(str(tmp_path))
    with pytest.raises(DatasetError, match=r"img00000001\.png: not a readable image .*replace or remove"):
        ds[1]


@pytest.mark.parametrize("odd", [random_images(1, size=16)[0], random_images(1, channels=1)[0]])
def test_mixed_sizes_or_channels(tmp_path, odd):
    write_dataset(str(tmp_path), random_images(2) + [odd])
    ds = ImageFolderDataset(str(tmp_path))
    ds[1]
    with pytest.raises(DatasetError, match=r"img00000002\.png: image is .* dataset's first image is \[3, 8, 8\]"):
        ds[2]


def test_resolution_mismatch(tmp_path):
    write_dataset(str(tmp_path), random_images(2))
    with pytest.raises(DatasetError, match=r"images are 8x8, not the requested 32x32; .*--resolution=32x32"):
        ImageFolderDataset(str(tmp_path), resolution=32)


def test_non_square_resolution(tmp_path):
    write_dataset(str(tmp_path), [np.zeros((4, 8, 3), np.uint8)])
    ds = ImageFolderDataset(str(tmp_path))
    assert ds.image_shape == [3, 4, 8]
    with pytest.raises(DatasetError, match="8x4, not square"):
        ds.resolution


@pytest.mark.parametrize("text, message", [
    ("{labels: [}", "not valid JSON"),
    ('{"classes": []}', "expected"),
    ('{"labels": [["a.png"]]}', "list of \\[file name, label\\] pairs"),
    ('{"labels": [["a.png", 1]]}', "no label for 00000/img00000000.png \\(2 images lack one\\)"),
    ('{"labels": [["00000/img00000000.png", 1], ["00000/img00000001.png", [0.5]]]}', "all integers"),
    ('{"labels": [["00000/img00000000.png", -1], ["00000/img00000001.png", 2]]}', ">= 0"),
])
def test_malformed_dataset_json(tmp_path, text, message):
    write_dataset(str(tmp_path), random_images(2))
    (tmp_path / "dataset.json").write_text(text)
    with pytest.raises(DatasetError, match=r"dataset\.json: .*" + message):
        ImageFolderDataset(str(tmp_path), use_labels=True)
    assert not ImageFolderDataset(str(tmp_path), use_labels=False).has_labels


def test_parse_labels_accepts_backslashes_and_null():
    assert parse_labels('{"labels": null}', ["a.png"], "x") is None
    np.testing.assert_array_equal(parse_labels('{"labels": [["d\\\\a.png", 4]]}', ["d/a.png"], "x"), [4])
