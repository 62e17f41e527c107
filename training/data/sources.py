"""Readers of the image collections that dataset_tool.py converts (``open_source`` picks one by the path). Each
gives a count and a lazy stream of ``SourceItem``s in a fixed order:

- a folder of images (recursive) or a ZIP of images. Labels: a ``dataset.json`` at the source's root, else, when the
  images lie in more than one top-level folder, the index of that folder's name in the sorted list of names
  (ImageNet's ``n01440764/...`` class folders become 0..999). Images are taken in sorted name order;
- the CIFAR-10 python tarball ``cifar-10-python.tar.gz`` (the 50,000 training images, with labels);
- MNIST-format idx files (``*-images-idx3-ubyte[.gz]`` beside ``*-labels-idx1-ubyte[.gz]``): MNIST and Fashion-MNIST,
  padded with 2 zero pixels on each side (28x28 -> 32x32) as the official tool does, or kept at their native 28x28
  with ``--resolution=28x28``; with labels. A folder holding such files (and no images) gives all its splits,
  ``train-*`` first: the full 70,000 of (Fashion-)MNIST;
- an LSUN lmdb folder (needs the optional ``lmdb`` package), unlabelled.
"""

from __future__ import annotations

import codecs
import gzip
import os
import pickle
import tarfile
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from training.data.dataset import DATASET_JSON, DatasetError, FileStore, is_image_file, iter_image_files, parse_labels


@dataclass
class SourceItem:
    """One image to convert. Exactly one of ``array`` (decoded pixels ``[H, W, C]``), ``data`` (encoded bytes)
    or neither (the file ``name`` of the source's FileStore) holds the pixels. ``name`` is used in messages."""

    name: str
    label: int | list[float] | None = None
    array: np.ndarray | None = None
    data: bytes | None = None


@dataclass
class Source:
    description: str
    count: int
    items: Iterable[SourceItem]
    store: FileStore | None = None
    decoded: bool = False  # items carry pixel arrays (CIFAR-10, MNIST), not files to decode


def _folder_labels(names: list[str]) -> list[int] | None:
    """Class index per image from its top-level folder name (sorted names), or None with fewer than 2 folders."""
    toplevel = [name.split("/")[0] if "/" in name else "" for name in names]
    classes = sorted(set(toplevel))
    if len(classes) < 2:
        return None
    index = {name: i for i, name in enumerate(classes)}
    return [index[name] for name in toplevel]


def open_image_files(path: str) -> Source:
    """A folder (recursive) or ZIP of images; labels from its dataset.json, else from class folder names."""
    store = FileStore(path)
    names = [name for name in store.names if is_image_file(name)]
    labels: list | None = None
    if DATASET_JSON in store.names:
        text = store.read_bytes(DATASET_JSON).decode("utf-8", errors="replace")
        parsed = parse_labels(text, names, store.location(DATASET_JSON))
        labels = None if parsed is None else parsed.tolist()
    if labels is None:
        labels = _folder_labels(names)
    if labels is None:
        labels = [None] * len(names)
    kind = "ZIP" if store.is_zip else "folder"
    items = (SourceItem(name=name, label=label) for name, label in zip(names, labels))
    return Source(f"{kind} {path}", len(names), items, store)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 batches (dicts of lists, strings and numpy arrays) and refuses anything else,
    so a tampered tarball cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        multiarray = getattr(np, "_core", None) or np.core
        # _codecs.encode only turns text into bytes; protocol-2 pickles written by Python 3 store bytes that way.
        allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}
        for numpy_module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed[(numpy_module, "_reconstruct")] = multiarray.multiarray._reconstruct
            allowed[(numpy_module, "scalar")] = multiarray.multiarray.scalar
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return allowed[(module, name)]


def open_cifar10(path: str) -> Source:
    """The CIFAR-10 python tarball: the five training batches, 50,000 RGB 32x32 images with labels 0..9."""
    fix = "download cifar-10-python.tar.gz again from https://www.cs.toronto.edu/~kriz/cifar.html"
    images, labels = [], []
    try:
        with tarfile.open(path, "r:*") as tar:
            for batch in range(1, 6):
                member = f"cifar-10-batches-py/data_batch_{batch}"
                try:
                    f = tar.extractfile(member)
                except KeyError:
                    raise DatasetError(f"{path}: not a CIFAR-10 python tarball (no {member}); {fix}") from None
                data = _NumpyOnlyUnpickler(f, encoding="latin1").load()
                images.append(np.asarray(data["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labels.extend(int(x) for x in data["labels"])
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{path}: cannot read the CIFAR-10 tarball ({type(e).__name__}: {e}); {fix}") from None
    array = np.concatenate(images)
    if array.shape[0] != len(labels):
        raise DatasetError(f"{path}: {array.shape[0]} images but {len(labels)} labels; {fix}")
    items = (SourceItem(name=f"{path}[{i}]", label=labels[i], array=array[i]) for i in range(len(labels)))
    return Source(f"CIFAR-10 {path}", len(labels), items, decoded=True)


def read_idx(path: str) -> np.ndarray:
    """An idx file (the MNIST format), gzipped or not, as a uint8 array of the shape its header gives."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read ({e}); download the file again") from None
    if len(data) < 4 or data[0:3] != b"\x00\x00\x08":
        raise DatasetError(f"{path}: not an idx file of unsigned bytes (bad header); download the file again")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if len(data) != header + int(np.prod(shape)):
        raise DatasetError(f"{path}: header says {shape} but the file holds {len(data) - header} bytes of data; "
                           f"download the file again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def idx_labels_path(images_path: str) -> str:
    folder, name = os.path.split(images_path)
    return os.path.join(folder, name.replace("images-idx3", "labels-idx1"))


def _read_mnist_split(path: str) -> tuple[np.ndarray, np.ndarray]:
    labels_path = idx_labels_path(path)
    if not os.path.isfile(labels_path):
        raise DatasetError(f"{path}: its labels file {labels_path} is missing; put it beside the images file")
    images = read_idx(path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{path}: images {list(images.shape)} do not match labels {list(labels.shape)} in "
                           f"{labels_path}; use the images and labels files of the same split")
    return images, labels


def mnist_splits_in(folder: str) -> list[str]:
    """The idx image files of a folder, training split first (``train-*`` before ``t10k-*``)."""
    names = [name for name in os.listdir(folder) if "images-idx3-ubyte" in name]
    return [os.path.join(folder, name) for name in sorted(names, key=lambda name: (not name.startswith("train"), name))]


MNIST_SIZE = 28  # Native width and height of (Fashion-)MNIST images.


def open_mnist(paths: list[str], pad: bool = True) -> Source:
    """MNIST-format images with the labels files beside them, split after split; 28x28, padded with zeros to
    32x32 (2 pixels on each side) with ``pad`` as the official tool does."""
    splits = [_read_mnist_split(path) for path in paths]
    images = np.concatenate([images for images, _ in splits])
    labels = np.concatenate([labels for _, labels in splits])
    if pad:
        images = np.pad(images, [[0, 0], [2, 2], [2, 2]], mode="constant", constant_values=0)
    images = images[..., np.newaxis]
    where = paths[0] if len(paths) == 1 else os.path.dirname(paths[0])
    items = (SourceItem(name=f"{where}[{i}]", label=int(labels[i]), array=images[i]) for i in range(len(labels)))
    return Source(f"MNIST-format {where}", len(labels), items, decoded=True)


def open_lmdb(path: str) -> Source:
    """An LSUN lmdb folder (encoded images as values, in key order), unlabelled."""
    try:
        import lmdb
    except ImportError:
        raise DatasetError(f"{path}: reading LSUN lmdb folders needs the optional lmdb package; "
                           f"pip install lmdb") from None
    try:
        with lmdb.open(path, readonly=True, lock=False, subdir=True) as env:
            count = env.stat()["entries"]
    except lmdb.Error as e:
        raise DatasetError(f"{path}: not a readable lmdb database ({e}); download it again") from None

    def items() -> Iterator[SourceItem]:
        with lmdb.open(path, readonly=True, lock=False, subdir=True) as env, env.begin(write=False) as txn:
            for key, value in txn.cursor():
                yield SourceItem(name=f"{path}[{key.decode(errors='replace')}]", data=bytes(value))

    return Source(f"LSUN lmdb {path}", count, items())


def _is_lmdb_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "data.mdb")) or path.rstrip("/\\").endswith("_lmdb")


def open_source(path: str, resolution: tuple[int, int] | None = None) -> Source:
    """Pick the reader for ``path`` (see the module docstring). ``resolution`` (width, height) is the output's:
    MNIST-format images stay unpadded when it is their native 28x28."""
    pad_mnist = resolution != (MNIST_SIZE, MNIST_SIZE)
    if not os.path.exists(path):
        raise DatasetError(f"--source={path}: no such file or folder; check the path")
    if os.path.isdir(path):
        if _is_lmdb_folder(path):
            return open_lmdb(path)
        if mnist_splits_in(path) and not iter_image_files(path):
            return open_mnist(mnist_splits_in(path), pad=pad_mnist)
        return open_image_files(path)
    name = os.path.basename(path).lower()
    if "images-idx3-ubyte" in name:
        return open_mnist([path], pad=pad_mnist)
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return open_cifar10(path)
    if name.endswith(".zip"):
        return open_image_files(path)
    raise DatasetError(f"--source={path}: unknown kind of source; give a folder or .zip of images, "
                       f"cifar-10-python.tar.gz, an *-images-idx3-ubyte.gz file or an LSUN lmdb folder")
