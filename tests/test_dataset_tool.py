"""dataset_tool.py and training/data/ (sources.py, convert.py): round trips from every kind of source, geometry, bad input."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from training.data.dataset import DatasetError, ImageFolderDataset
from training.data.convert import Geometry, archive_name, convert_dataset, parse_resolution
from training.data.sources import read_idx


FASHION_MNIST_T10K = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                                  "fashion-mnist", "t10k-images-idx3-ubyte.gz")


def save_image(path, array: np.ndarray, **kwargs) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array).save(path, **kwargs)


def random_images(n: int, h: int = 8, w: int = 8, c: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, c), dtype=np.uint8) for _ in range(n)]


def read_back(path: str) -> tuple[np.ndarray, np.ndarray | None, ImageFolderDataset]:
    """All images [N, C, H, W] and class indices (None when unlabelled) of a written dataset."""
    ds = ImageFolderDataset(path, use_labels=True)
    images = np.stack([ds[i][0] for i in range(len(ds))])
    labels = np.array([ds.get_label(i).argmax() for i in range(len(ds))]) if ds.has_labels else None
    return images, labels, ds


def convert(source, dest, **kwargs):
    return convert_dataset(str(source), str(dest), progress=False, workers=kwargs.pop("workers", 1), **kwargs)


# Round trips.


def test_folder_with_class_subfolders_round_trip(tmp_path):
    images = random_images(6)
    classes = ["zebra", "ant", "ant", "moth", "zebra", "moth"]  # sorted: ant=0, moth=1, zebra=2
    formats = ["png", "webp", "bmp", "png", "tiff", "ppm"]
    for i, (image, cls, fmt) in enumerate(zip(images, classes, formats)):
        save_image(tmp_path / "src" / cls / f"{i}.{fmt}", image, **({"lossless": True} if fmt == "webp" else {}))
    summary = convert(tmp_path / "src", tmp_path / "out.zip")
    assert (summary.num_images, summary.num_classes, summary.image_shape) == (6, 3, (8, 8, 3))
    got, labels, ds = read_back(str(tmp_path / "out.zip"))
    # Sorted names: ant/1, ant/2, moth/3, moth/5, zebra/0, zebra/4.
    order = [1, 2, 3, 5, 0, 4]
    np.testing.assert_array_equal(got, np.stack([images[i] for i in order]).transpose(0, 3, 1, 2))
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    with zipfile.ZipFile(tmp_path / "out.zip") as zf:
        assert zf.namelist() == [archive_name(i) for i in range(6)] + ["dataset.json"]
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())


def test_zip_source_with_dataset_json_to_folder(tmp_path):
    images = random_images(3, c=1)
    with zipfile.ZipFile(tmp_path / "src.zip", "w") as zf:
        for i, image in enumerate(images):
            buf = io.BytesIO()
            PIL.Image.fromarray(image[:, :, 0]).save(buf, format="png")
            zf.writestr(f"a/{i}.png", buf.getvalue())
        zf.writestr("dataset.json", json.dumps({"labels": [["a/0.png", 7], ["a/1.png", 2], ["a/2.png", 7]]}))
    convert(tmp_path / "src.zip", tmp_path / "out", workers=2)
    assert sorted(os.listdir(tmp_path / "out")) == ["00000", "dataset.json"]
    got, labels, ds = read_back(str(tmp_path / "out"))
    assert ds.num_channels == 1
    np.testing.assert_array_equal(got, np.stack(images).transpose(0, 3, 1, 2))
    assert labels.tolist() == [7, 2, 7]


def test_unlabelled_folder_and_converted_modes(tmp_path):
    rgba = np.dstack([random_images(1)[0], np.zeros((8, 8, 1), np.uint8)])
    gray16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    save_image(tmp_path / "src" / "a.png", rgba)
    PIL.Image.fromarray(gray16).save(tmp_path / "src" / "b.png")
    with pytest.raises(DatasetError, match=r"b\.png: grayscale but the first image is RGB"):
        convert(tmp_path / "src", tmp_path / "out.zip")
    os.remove(tmp_path / "src" / "b.png")
    convert(tmp_path / "src", tmp_path / "out.zip")
    got, labels, _ = read_back(str(tmp_path / "out.zip"))
    assert labels is None
    np.testing.assert_array_equal(got[0], rgba[:, :, :3].transpose(2, 0, 1))
    (tmp_path / "gray").mkdir()
    PIL.Image.fromarray(gray16).save(tmp_path / "gray" / "b.png")
    convert(tmp_path / "gray", tmp_path / "gray.zip")
    got, _, _ = read_back(str(tmp_path / "gray.zip"))
    np.testing.assert_array_equal(got[0, 0], (gray16.astype(np.int64) * 255 + 32767) // 65535)


def test_workers_give_identical_zip_and_max_images(tmp_path):
    for i, image in enumerate(random_images(10, h=12, w=12)):
        save_image(tmp_path / "src" / f"{i:02d}.png", image)
    convert(tmp_path / "src", tmp_path / "one.zip", resolution=(8, 8), workers=1)
    convert(tmp_path / "src", tmp_path / "two.zip", resolution=(8, 8), workers=2)
    assert (tmp_path / "one.zip").read_bytes() == (tmp_path / "two.zip").read_bytes()
    summary = convert(tmp_path / "src", tmp_path / "four.zip", max_images=4, workers=2)
    assert summary.num_images == 4
    got, _, _ = read_back(str(tmp_path / "four.zip"))
    full, _, _ = read_back(str(tmp_path / "src"))
    np.testing.assert_array_equal(got, full[:4])


def make_cifar_tarball(path, images: np.ndarray, labels: list[int], payload=None) -> None:
    """A tarball in the layout of cifar-10-python.tar.gz: five pickled batches of 'data' [N, 3072] and 'labels'."""
    with tarfile.open(path, "w:gz") as tar:
        for batch, (chunk, chunk_labels) in enumerate(zip(np.array_split(images, 5), np.array_split(labels, 5))):
            data = {"batch_label": f"training batch {batch + 1} of 5",
                    "data": chunk.transpose(0, 3, 1, 2).reshape(len(chunk), -1), "labels": chunk_labels.tolist()}
            blob = pickle.dumps(payload if payload is not None else data, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{batch + 1}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_cifar10_tarball_round_trip(tmp_path):
    images = np.stack(random_images(10, h=32, w=32))
    labels = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    make_cifar_tarball(tmp_path / "cifar-10-python.tar.gz", images, labels)
    summary = convert(tmp_path / "cifar-10-python.tar.gz", tmp_path / "cifar.zip")
    assert (summary.num_images, summary.num_classes) == (10, 10)
    got, got_labels, ds = read_back(str(tmp_path / "cifar.zip"))
    np.testing.assert_array_equal(got, images.transpose(0, 3, 1, 2))
    assert got_labels.tolist() == labels and ds.label_dim == 10


def test_cifar10_tarball_refuses_code_in_pickles(tmp_path):
    make_cifar_tarball(tmp_path / "evil.tar.gz", np.zeros((5, 32, 32, 3), np.uint8), [0] * 5, payload=os.getcwd)
    with pytest.raises(DatasetError, match=r"evil\.tar\.gz: cannot read the CIFAR-10 tarball .*unexpected object"):
        convert(tmp_path / "evil.tar.gz", tmp_path / "out.zip")


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_round_trip_with_padding(tmp_path):
    images = np.random.default_rng(1).integers(1, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = np.array([9, 0, 0, 3, 8, 1, 2], np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    convert(tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "mnist.zip")
    got, got_labels, ds = read_back(str(tmp_path / "mnist.zip"))
    assert got.shape == (7, 1, 32, 32) and ds.label_dim == 10
    np.testing.assert_array_equal(got[:, 0, 2:30, 2:30], images)
    assert got[:, :, :2].max() == got[:, :, 30:].max() == got[:, :, :, :2].max() == got[:, :, :, 30:].max() == 0
    assert got_labels.tolist() == labels.tolist()


def test_idx_files_at_native_28x28_are_the_raw_pixels(tmp_path):
    """--resolution=28x28 keeps (Fashion-)MNIST unpadded and unresized; any other size pads to 32x32 first."""
    images = np.random.default_rng(3).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([1, 2, 3, 4]))
    convert(tmp_path / "t10k-images-idx3-ubyte.gz", tmp_path / "native.zip", resolution=(28, 28))
    got, labels, ds = read_back(str(tmp_path / "native.zip"))
    assert ds.resolution == 28 and labels.tolist() == [1, 2, 3, 4]
    np.testing.assert_array_equal(got[:, 0], images)
    convert(tmp_path / "t10k-images-idx3-ubyte.gz", tmp_path / "resized.zip", resolution=(16, 16))
    resized, _, _ = read_back(str(tmp_path / "resized.zip"))
    padded = np.pad(images, [[0, 0], [2, 2], [2, 2]])[..., np.newaxis]
    expected = np.stack([Geometry(None, 16, 16).apply(image) for image in padded])
    np.testing.assert_array_equal(resized, expected.transpose(0, 3, 1, 2))


def test_folder_of_idx_splits_gives_train_then_test(tmp_path):
    """A folder such as /usr/share/datasets/fashion-mnist converts all its splits: the full 70,000 images."""
    rng = np.random.default_rng(2)
    splits = {"train": rng.integers(0, 256, (5, 28, 28)), "t10k": rng.integers(0, 256, (3, 28, 28))}
    (tmp_path / "src").mkdir()
    for split, images in splits.items():
        write_idx(tmp_path / "src" / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / "src" / f"{split}-labels-idx1-ubyte.gz", np.arange(len(images)) + (split == "t10k") * 5)
    convert(tmp_path / "src", tmp_path / "all.zip")
    got, labels, _ = read_back(str(tmp_path / "all.zip"))
    np.testing.assert_array_equal(got[:, 0, 2:30, 2:30], np.concatenate([splits["train"], splits["t10k"]]))
    assert labels.tolist() == list(range(8))


def test_embedded_fashion_mnist(fashion_mnist_zip):
    """The embedded test split: 10,000 images, 32x32 gray with a 2-pixel zero border, 1,000 per class."""
    raw = read_idx(FASHION_MNIST_T10K)
    raw_labels = read_idx(FASHION_MNIST_T10K.replace("images-idx3", "labels-idx1"))
    got, labels, ds = read_back(fashion_mnist_zip)
    assert (len(ds), ds.image_shape, ds.resolution, ds.label_dim) == (10000, [1, 32, 32], 32, 10)
    np.testing.assert_array_equal(got[:, 0, 2:30, 2:30], raw)
    padded = np.ones((32, 32), bool)
    padded[2:30, 2:30] = False
    assert got[:, 0, padded].max() == 0
    np.testing.assert_array_equal(labels, raw_labels)
    assert np.bincount(labels).tolist() == [1000] * 10


def test_first_and_max_images_make_disjoint_splits(tmp_path, fashion_mnist_zip):
    """--max-images=N and --first=N split a source into two parts that together are the whole, in order."""
    convert(FASHION_MNIST_T10K, tmp_path / "a.zip", max_images=300)
    convert(FASHION_MNIST_T10K, tmp_path / "b.zip", first_image=9800)
    a, a_labels, _ = read_back(str(tmp_path / "a.zip"))
    b, b_labels, _ = read_back(str(tmp_path / "b.zip"))
    whole, whole_labels, _ = read_back(fashion_mnist_zip)
    assert (len(a), len(b)) == (300, 200)
    np.testing.assert_array_equal(a, whole[:300])
    np.testing.assert_array_equal(b, whole[9800:])
    np.testing.assert_array_equal(b_labels, whole_labels[9800:])
    with pytest.raises(DatasetError, match="--first=10000: .* has only 10000 images"):
        convert(FASHION_MNIST_T10K, tmp_path / "c.zip", first_image=10000)


def test_lmdb_round_trip(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    images = random_images(3, h=16, w=16)
    with lmdb.open(str(tmp_path / "bedroom_train_lmdb"), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for i, image in enumerate(images):
            buf = io.BytesIO()
            PIL.Image.fromarray(image).save(buf, format="webp", lossless=True)
            txn.put(f"key{i}".encode(), buf.getvalue())
    convert(tmp_path / "bedroom_train_lmdb", tmp_path / "lsun.zip", workers=2)
    got, labels, _ = read_back(str(tmp_path / "lsun.zip"))
    assert labels is None
    np.testing.assert_array_equal(got, np.stack(images).transpose(0, 3, 1, 2))


def test_lmdb_missing_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "lmdb", None)
    (tmp_path / "church_lmdb").mkdir()
    with pytest.raises(DatasetError, match="needs the optional lmdb package; pip install lmdb"):
        convert(tmp_path / "church_lmdb", tmp_path / "out.zip")


# Geometry.


def test_center_crop_takes_the_middle_square():
    columns = np.tile(np.arange(6, dtype=np.uint8)[None, :, None] * 40, (4, 1, 3))  # 6 wide, 4 tall
    cropped = Geometry("center-crop", 4, 4).apply(columns)
    np.testing.assert_array_equal(cropped[0, :, 0], [40, 80, 120, 160])
    rows = columns.transpose(1, 0, 2)  # 4 wide, 6 tall
    np.testing.assert_array_equal(Geometry("center-crop", 4, 4).apply(rows)[:, 0, 0], [40, 80, 120, 160])
    assert Geometry("center-crop", 3, 3).apply(np.zeros((40, 90, 1), np.uint8)).shape == (3, 3, 1)


def test_center_crop_wide_pads_rows_and_resize():
    flat = np.full((30, 80, 3), 200, np.uint8)  # 8:3, cropped to 2:1 = 60x30, resized to 8x4
    wide = Geometry("center-crop-wide", 8, 4).apply(flat)
    assert wide.shape == (8, 8, 3)
    assert (wide[:2] == 0).all() and (wide[6:] == 0).all() and (wide[2:6] == 200).all()
    resized = Geometry(None, 5, 5).apply(np.full((7, 13, 3), (10, 100, 250), np.uint8))
    assert resized.shape == (5, 5, 3) and (resized == [10, 100, 250]).all()
    same = random_images(1)[0]
    assert Geometry(None, 8, 8).apply(same) is same


def test_center_crop_dhariwal_halves_by_box_then_bicubic_then_crops_the_center():
    """ADM's crop: 300x200 -> 64 halves once (200 >= 128) to the 2x2 block means, 150x100, scales bicubically by
    0.64 to 96x64 and keeps columns 16..79; 100x80 is only scaled (by 0.8, to 80x64) and keeps columns 8..71."""
    image = np.random.default_rng(0).integers(0, 256, size=(200, 300, 3), dtype=np.uint8)
    halved = image.reshape(100, 2, 150, 2, 3).astype(np.float64).mean(axis=(1, 3))
    bicubic = PIL.Image.fromarray(np.round(halved).astype(np.uint8)).resize((96, 64), PIL.Image.Resampling.BICUBIC)
    cropped = Geometry("center-crop-dhariwal", 64, 64).apply(image)
    assert cropped.shape == (64, 64, 3)
    assert np.abs(cropped.astype(int) - np.asarray(bicubic)[:, 16:80].astype(int)).max() <= 2  # PIL rounds the box.
    small = image[:80, :100]
    expected = np.asarray(PIL.Image.fromarray(small).resize((80, 64), PIL.Image.Resampling.BICUBIC))[:, 8:72]
    np.testing.assert_array_equal(Geometry("center-crop-dhariwal", 64, 64).apply(small), expected)
    with pytest.raises(DatasetError, match="center-crop-dhariwal makes squares; give --resolution=NxN, got 64x32"):
        Geometry("center-crop-dhariwal", 64, 32)


def test_resolution_unifies_mixed_sizes(tmp_path):
    save_image(tmp_path / "src" / "a.png", random_images(1, h=20, w=20)[0])
    save_image(tmp_path / "src" / "b.png", random_images(1, h=10, w=14)[0])
    summary = convert(tmp_path / "src", tmp_path / "out.zip", resolution=(16, 16), transform="center-crop")
    assert summary.image_shape == (16, 16, 3)


def test_parse_resolution():
    assert parse_resolution("64x32") == (64, 32)
    for bad in ["64", "x64", "64x0", "axb"]:
        with pytest.raises(DatasetError, match="expected WIDTHxHEIGHT"):
            parse_resolution(bad)


# Bad input through the CLI: exit code 1, one line naming the file and the fix, nothing left at --dest.


def run_cli(tmp_path, source, *extra):
    dest = tmp_path / "out.zip"
    result = CliRunner().invoke(dataset_tool.main, [f"--source={source}", f"--dest={dest}", "--workers=1", *extra])
    leftovers = [name for name in os.listdir(tmp_path) if name.startswith(".out.zip")]
    return result, dest, leftovers


def visible_lines(text: str) -> list[str]:
    """What a terminal shows: each line's text after its last carriage return (progress bars redraw with \\r)."""
    return [shown for line in text.split("\n") if (shown := line.split("\r")[-1].strip())]


def assert_clean_failure(result, dest, leftovers, pattern):
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = visible_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert re.search(pattern, lines[0]), lines[0]
    assert not dest.exists() and leftovers == []


def good_folder(tmp_path, n=4):
    for i, image in enumerate(random_images(n)):
        save_image(tmp_path / "src" / f"{i}.png", image)
    return tmp_path / "src"


def test_corrupt_image_and_skip_bad(tmp_path):
    src = good_folder(tmp_path)
    data = (src / "2.png").read_bytes()
    (src / "2.png").write_bytes(data[: len(data) // 2])
    assert_clean_failure(*run_cli(tmp_path, src), r"2\.png: not a readable image .*--skip-bad")
    result, dest, _ = run_cli(tmp_path, src, "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "skipped: " in result.output and "Wrote 3 images (8x8, 3 channels, no labels)" in result.output
    assert "skipped 1 unreadable files" in result.output
    assert len(ImageFolderDataset(str(dest))) == 3


def test_unreadable_file(tmp_path):
    src = good_folder(tmp_path)
    os.symlink(tmp_path / "gone.png", src / "3b.png")
    assert_clean_failure(*run_cli(tmp_path, src), r"3b\.png: cannot read .*replace or remove")


def test_empty_source(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_failure(*run_cli(tmp_path, tmp_path / "empty"), r"empty: no images found")


def test_mixed_sizes_without_resolution(tmp_path):
    src = good_folder(tmp_path)
    save_image(src / "9.png", random_images(1, h=16, w=16)[0])
    assert_clean_failure(*run_cli(tmp_path, src), r"9\.png: 16x16 but the first image is 8x8; add --resolution=WxH")


def test_non_square_without_transform(tmp_path):
    save_image(tmp_path / "src" / "a.png", random_images(1, h=8, w=12)[0])
    assert_clean_failure(*run_cli(tmp_path, tmp_path / "src"), r"a\.png: 12x8 is not square.*center-crop")


def test_malformed_dataset_json(tmp_path):
    src = good_folder(tmp_path)
    (src / "dataset.json").write_text('{"labels": [["0.png", 1]')
    assert_clean_failure(*run_cli(tmp_path, src), r"dataset\.json: not valid JSON")


def test_destination_exists(tmp_path):
    src = good_folder(tmp_path)
    (tmp_path / "out.zip").write_bytes(b"keep me")
    result, dest, _ = run_cli(tmp_path, src)
    assert result.exit_code == 1 and "out.zip already exists; remove it or choose another path" in result.output
    assert dest.read_bytes() == b"keep me"


@pytest.mark.parametrize("name, content, pattern", [
    ("missing.zip", None, r"missing\.zip: no such file"),
    ("broken.zip", b"PK\x03\x04 not really", r"broken\.zip: not a readable ZIP file"),
    ("cifar-10-python.tar.gz", b"\x1f\x8b\x08 truncated", r"cifar-10-python\.tar\.gz: cannot read the CIFAR-10"),
    ("t10k-images-idx3-ubyte.gz", b"", r"labels-idx1-ubyte\.gz is missing; put it beside"),
    ("notes.txt", b"hello", r"notes\.txt: unknown kind of source"),
])
def test_bad_source_files(tmp_path, name, content, pattern):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    assert_clean_failure(*run_cli(tmp_path, tmp_path / name), pattern)


def test_bad_options(tmp_path):
    src = good_folder(tmp_path)
    assert_clean_failure(*run_cli(tmp_path, src, "--transform=center-crop"), r"needs an output size; add --resolution")
    assert_clean_failure(*run_cli(tmp_path, src, "--resolution=64"), r"--resolution=64: expected WIDTHxHEIGHT")
    assert_clean_failure(*run_cli(tmp_path, src, "--transform=center-crop-wide", "--resolution=4x8"),
                         r"needs a wide --resolution")
