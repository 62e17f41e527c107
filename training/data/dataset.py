"""The one reader of the dataset format that ``dataset_tool.py`` writes and training and FID read.

A dataset is an uncompressed ZIP or a folder of image files (PNG from ``dataset_tool.py``, any format PIL
opens in a folder), stored in subfolders of 1000 (``00000/img00000000.png``), with an optional
``dataset.json`` = ``{"labels": [["00000/img00000000.png", 6], ...]}`` or ``{"labels": null}``.
Integer labels are class indices (returned one-hot); lists of numbers are kept as float vectors.
This is the official EDM format, so datasets made by the official tools read here and vice versa.

A dataset of latents (``dataset_tool.py encode``, EDM2's format) holds ``.npy`` files instead, one raw latent
``[C, H, W]`` float32 each (``00000/img-mean-std-00000000.npy``; see ``encoders``); it is read the same way.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import IO, Any

import numpy as np
import PIL.Image
import torch

DATASET_JSON = "dataset.json"


class DatasetError(IOError):
    """A dataset that cannot be read; the message names the file and the fix."""


def _readable_extensions() -> frozenset[str]:
    PIL.Image.init()
    return frozenset(ext.lower() for ext, fmt in PIL.Image.registered_extensions().items() if fmt in PIL.Image.OPEN)


IMAGE_EXTENSIONS = _readable_extensions()


LATENT_EXTENSION = ".npy"


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_latent_file(name: str) -> bool:
    return name.lower().endswith(LATENT_EXTENSION)


def _is_hidden(name: str) -> bool:
    # macOS leaves '._x.png' resource forks and '__MACOSX/' folders beside real images; they are not images.
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


# ----------------------------------------------------------------------------------------------------------------
# Files of a ZIP or a folder, by their relative POSIX names.


class FileStore:
    """The files of a ZIP archive or a folder (recursive), named by relative POSIX paths.

    Safe to share with DataLoader workers and multiprocessing pools: the ZIP is opened lazily in each process
    (a forked child never reuses its parent's file handle) and is not pickled.
    """

    def __init__(self, path: str) -> None:
        if not os.path.exists(path):
            raise DatasetError(f"{path}: no such file or folder; give the path of a dataset ZIP or folder "
                               f"(make one with dataset_tool.py)")
        self.path = path
        self.is_zip = os.path.isfile(path)
        self._zipfile: zipfile.ZipFile | None = None
        self._zipfile_pid: int | None = None
        if self.is_zip:
            self.names = sorted(name for name in self._get_zipfile().namelist() if not name.endswith("/"))
        else:
            self.names = sorted(
                os.path.relpath(os.path.join(root, fname), path).replace(os.sep, "/")
                for root, _dirs, files in os.walk(path)
                for fname in files
            )
        self.names = [name for name in self.names if not _is_hidden(name)]

    def _get_zipfile(self) -> zipfile.ZipFile:
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            try:
                self._zipfile = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as e:
                raise DatasetError(f"{self.path}: not a readable ZIP file ({e}); re-create it with dataset_tool.py"
                                   ) from None
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def open(self, name: str) -> IO[bytes]:
        if self.is_zip:
            return self._get_zipfile().open(name, "r")
        return open(os.path.join(self.path, name), "rb")

    def read_bytes(self, name: str) -> bytes:
        try:
            with self.open(name) as f:
                return f.read()
        except (OSError, zipfile.BadZipFile, KeyError, EOFError) as e:
            raise DatasetError(f"{self.location(name)}: cannot read ({e}); replace or remove the file") from None

    def read_image(self, name: str) -> np.ndarray:
        """Decode one image to uint8 ``[H, W, C]`` with C = 1 (grayscale) or 3 (color); see ``image_to_array``."""
        data = self.read_bytes(name)
        try:
            with PIL.Image.open(io.BytesIO(data)) as image:
                return image_to_array(image)
        except (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError) as e:
            raise DatasetError(f"{self.location(name)}: not a readable image ({e}); replace or remove the file"
                               ) from None

    def read_latent(self, name: str) -> np.ndarray:
        """A raw latent: the float32 ``[C, H, W]`` array of a ``.npy`` file (no pickled objects)."""
        data = self.read_bytes(name)
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{self.location(name)}: not a readable .npy file ({e}); replace or remove it") from None
        if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating):
            raise DatasetError(f"{self.location(name)}: a latent must be a float [C, H, W] array, got "
                               f"{array.dtype} {list(array.shape)}; re-create the dataset with dataset_tool.py encode")
        return np.ascontiguousarray(array, dtype=np.float32)

    def location(self, name: str) -> str:
        """Where a file is, for messages: ``archive.zip:00000/img00000000.png`` or a folder path."""
        return f"{self.path}:{name}" if self.is_zip else os.path.join(self.path, name)

    def close(self) -> None:
        """Drop this process's ZIP handle; the next read opens the archive again."""
        handle, self._zipfile = self._zipfile, None
        if handle is not None:
            handle.close()

    def __getstate__(self) -> dict[str, Any]:
        # An open ZipFile cannot travel to another process: the receiver opens its own on first use.
        state = self.__dict__.copy()
        state.update(_zipfile=None, _zipfile_pid=None)
        return state


def iter_image_files(path: str) -> list[str]:
    """Sorted relative names of the image files in a ZIP or folder (hidden files and ``__MACOSX/`` skipped)."""
    store = FileStore(path)
    try:
        return [name for name in store.names if is_image_file(name)]
    finally:
        store.close()


def image_to_array(image: PIL.Image.Image) -> np.ndarray:
    """Pixels of a PIL image as uint8 ``[H, W, C]``: grayscale stays one channel, everything else becomes RGB.

    Conversions: bilevel ('1') -> 0/255 grayscale; 16/32-bit grayscale ('I;16', 'I') -> 8 bits by
    round(v * 255 / 65535); grayscale+alpha ('LA') -> grayscale with alpha dropped; RGBA, palette ('P', 'PA'),
    CMYK, YCbCr and others -> RGB via PIL (alpha dropped: the colour stored under transparent pixels is kept).
    """
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.asarray(image).astype(np.int64).clip(0, 65535)
        array = ((wide * 255 + 32767) // 65535).astype(np.uint8)
    elif mode in ("L", "1", "LA"):
        array = np.asarray(image.convert("L"))
    elif mode == "RGB":
        array = np.asarray(image)
    else:
        array = np.asarray(image.convert("RGB"))
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    return np.ascontiguousarray(array, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Labels from dataset.json.


def parse_labels(text: str, image_names: list[str], where: str) -> np.ndarray | None:
    """Labels of ``image_names`` from the text of a ``dataset.json``, or None when it says ``"labels": null``.

    Returns int64 ``[N]`` class indices or float32 ``[N, D]`` vectors, in the order of ``image_names``.
    Raises DatasetError naming ``where`` for malformed JSON, a missing label, or labels of mixed kinds.
    """
    fix = "fix it or remove it"
    try:
        data = json.loads(text)
    except ValueError as e:
        raise DatasetError(f"{where}: not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict) or "labels" not in data:
        raise DatasetError(f'{where}: expected {{"labels": [[file, label], ...]}} or {{"labels": null}}; {fix}')
    entries = data["labels"]
    if entries is None:
        return None
    if not isinstance(entries, list) or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
                                                for e in entries):
        raise DatasetError(f'{where}: "labels" must be a list of [file name, label] pairs; {fix}')
    by_name = {name.replace("\\", "/"): label for name, label in entries}
    missing = [name for name in image_names if name not in by_name]
    if missing:
        raise DatasetError(f"{where}: no label for {missing[0]} ({len(missing)} images lack one); "
                           f"add their labels or remove the images")
    labels = [by_name[name] for name in image_names]
    if all(isinstance(x, int) and not isinstance(x, bool) for x in labels):
        array = np.array(labels, dtype=np.int64)
        if array.size and array.min() < 0:
            raise DatasetError(f"{where}: class labels must be >= 0, found {array.min()}; {fix}")
        return array
    try:
        array = np.array(labels, dtype=np.float32)
    except (ValueError, TypeError):
        array = None
    if array is None or array.ndim != 2:
        raise DatasetError(f"{where}: labels must be all integers (classes) or all lists of the same length "
                           f"(vectors); {fix}")
    return array


# ----------------------------------------------------------------------------------------------------------------
# Which raw images a dataset shows, in which order, and how labels look to the network.


def kept_raw_indices(num_images: int, max_size: int | None, random_seed: int) -> np.ndarray:
    """int64 indices of the raw images that ``max_size`` keeps, in file order.

    All of them when ``max_size`` is None or not below ``num_images``; otherwise the first ``max_size`` of a
    permutation drawn by ``np.random.RandomState(random_seed mod 2^31)``, sorted (the official selection).
    """
    indices = np.arange(num_images, dtype=np.int64)
    if max_size is None or num_images <= max_size:
        return indices
    rng = np.random.RandomState(random_seed % 2 ** 31)
    rng.shuffle(indices)
    return np.sort(indices[:max_size])


def with_mirrors(raw_indices: np.ndarray, xflip: bool) -> tuple[np.ndarray, np.ndarray]:
    """(raw index, uint8 mirror flag) per dataset item; ``xflip`` appends every item again, flagged as mirrored."""
    copies = 2 if xflip else 1
    flags = np.repeat(np.arange(copies, dtype=np.uint8), raw_indices.size)
    return np.tile(raw_indices, copies), flags


def one_hot(class_index: int, num_classes: int) -> np.ndarray:
    """float32 ``[num_classes]`` vector with a single 1 at ``class_index``."""
    return (np.arange(num_classes) == class_index).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# The dataset.


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images (uint8 ``[C, H, W]``) or raw latents (float32 ``[C, H, W]``, ``is_latent``) and labels (float32
    one-hot, or ``[0]`` when unlabelled) of a ZIP or folder.

    ``max_size`` keeps a random subset (seeded by ``random_seed``, in file order); ``xflip`` appends a mirrored
    copy of every image (the second half of the indices are the flips), as the official reader does. Latents are
    never mirrored: the mirror of a latent is not the latent of the mirrored image.
    """

    def __init__(self, path: str, resolution: int | None = None, use_labels: bool = False,
                 max_size: int | None = None, xflip: bool = False, random_seed: int = 0,
                 cache: bool = False) -> None:
        self._path = path
        self._use_labels = use_labels
        self._cache = cache
        self._cached_images: dict[int, np.ndarray] = {}
        self._store = FileStore(path)
        latents = [name for name in self._store.names if is_latent_file(name)]
        self._image_fnames = latents or [name for name in self._store.names if is_image_file(name)]
        if not self._image_fnames:
            raise DatasetError(f"{path}: no image files found; convert your images into a dataset with "
                               f"dataset_tool.py")
        self.is_latent = bool(latents)
        if self.is_latent and any(is_image_file(name) for name in self._store.names):
            raise DatasetError(f"{path}: holds both images and latents (.npy); a dataset is one or the other")
        if self.is_latent and xflip:
            raise DatasetError(f"{path}: a dataset of latents cannot be mirrored (xflip): the mirror of a latent is "
                               f"not the latent of the mirrored image; leave out --xflip")
        self.name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        self._raw_shape = [len(self._image_fnames), *self._load_raw_image(0).shape]
        if resolution is not None and tuple(self._raw_shape[2:]) != (resolution, resolution):
            raise DatasetError(f"{path}: images are {self._raw_shape[3]}x{self._raw_shape[2]}, not the requested "
                               f"{resolution}x{resolution}; re-create the dataset with dataset_tool.py "
                               f"--resolution={resolution}x{resolution} or ask for resolution={self._raw_shape[2]}")
        num_images = len(self._image_fnames)
        labels = self._load_raw_labels() if use_labels else None
        # Without labels every image has an empty float32 label vector.
        self._raw_labels = np.zeros([num_images, 0], dtype=np.float32) if labels is None else labels
        self._raw_idx, self._xflip = with_mirrors(kept_raw_indices(num_images, max_size, random_seed), xflip)

    # Images are uint8 [C, H, W], all of the first image's shape.

    @property
    def resolution(self) -> int:
        _count, _channels, height, width = self._raw_shape
        if width != height:
            raise DatasetError(f"{self._path}: images are {width}x{height}, not square; re-create the dataset "
                               f"with dataset_tool.py --resolution=NxN or --transform=center-crop")
        return height

    num_channels = property(lambda self: self._raw_shape[1],
                            doc="C: 1 (grayscale) or 3 (color), or a raw latent's channels (int).")
    image_shape = property(lambda self: self._raw_shape[1:], doc="``[C, H, W]`` of every image (list of int).")

    # Reading.

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        name = self._image_fnames[raw_idx]
        if is_latent_file(name):
            return self._store.read_latent(name)
        return self._store.read_image(name).transpose(2, 0, 1)

    def _load_raw_labels(self) -> np.ndarray | None:
        if DATASET_JSON not in self._store.names:
            return None
        where = self._store.location(DATASET_JSON)
        text = self._store.read_bytes(DATASET_JSON).decode("utf-8", errors="replace")
        return parse_labels(text, self._image_fnames, where)

    def _raw_image(self, raw_idx: int) -> np.ndarray:
        """Image ``raw_idx`` (uint8 CHW), checked against the first image's shape; kept in memory with ``cache``."""
        if raw_idx in self._cached_images:
            return self._cached_images[raw_idx]
        image = self._load_raw_image(raw_idx)
        if list(image.shape) != self.image_shape:
            fname = self._store.location(self._image_fnames[raw_idx])
            raise DatasetError(f"{fname}: image is {list(image.shape)} (C, H, W) but the dataset's first image is "
                               f"{self.image_shape}; re-create the dataset with dataset_tool.py --resolution=WxH")
        if self._cache:
            self._cached_images[raw_idx] = image
        return image

    def __len__(self) -> int:
        return len(self._raw_idx)

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 CHW image, float32 label) of item ``idx``; a fresh array each call, mirrored for flip items."""
        image = self._raw_image(int(self._raw_idx[idx]))
        mirrored = bool(self._xflip[idx])
        pixels = image[:, :, ::-1] if mirrored else image
        return pixels.copy(), self.get_label(idx)

    def get_label(self, idx: int) -> np.ndarray:
        """Label of item ``idx`` as the network sees it: class indices become one-hot vectors."""
        raw_label = self._raw_labels[self._raw_idx[idx]]
        return one_hot(raw_label, self.label_dim) if self.has_onehot_labels else raw_label.copy()

    # Labels are [label_dim] vectors; label_dim is 0 when the dataset has none or use_labels is off.

    @property
    def has_onehot_labels(self) -> bool:
        """Class-index labels (handed out one-hot) rather than float vectors or none."""
        return self._raw_labels.dtype == np.int64

    def _label_width(self) -> int:
        if not self.has_onehot_labels:
            (width,) = self._raw_labels.shape[1:]
            return width
        return int(self._raw_labels.max()) + 1 if len(self._raw_labels) else 0

    label_dim = property(_label_width, doc="Length of every label vector (int).")
    label_shape = property(lambda self: [self._label_width()], doc="``[label_dim]`` (list of int).")
    has_labels = property(lambda self: self._label_width() > 0, doc="Whether labels are non-empty (bool).")

    def get_details(self, idx: int) -> dict[str, Any]:
        raw_idx = int(self._raw_idx[idx])
        return dict(raw_idx=raw_idx, xflip=bool(self._xflip[idx]), raw_label=self._raw_labels[raw_idx].copy())

    def close(self) -> None:
        self._store.close()


def open_image_dataset(path: str, **kwargs) -> ImageFolderDataset:
    """An ``ImageFolderDataset`` of images, for what compares images (FID, FD-DINOv2 references): a dataset of
    latents is refused in one line, since its statistics would not be those of images."""
    dataset = ImageFolderDataset(path, **kwargs)
    if dataset.is_latent:
        raise DatasetError(f"{path}: holds latents (dataset_tool.py encode), not images; give the image dataset "
                           f"they were encoded from, or its reference statistics (fid.py ref)")
    return dataset
