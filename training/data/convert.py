"""Converting image collections (``sources``) into the dataset format of ``dataset`` (the official EDM format).

Output: PNGs named ``00000/img00000000.png`` (subfolders of 1000) in an uncompressed ZIP (``--dest`` ending in
``.zip``) or a folder, plus ``dataset.json``. Everything is written to a temporary path beside ``dest`` and
renamed at the end, so ``dest`` either holds a complete dataset or does not exist.
"""

from __future__ import annotations

import io
import itertools
import json
import multiprocessing
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import PIL.Image
from tqdm import tqdm

from training.data.dataset import DATASET_JSON, DatasetError, FileStore, image_to_array
from training.data.sources import SourceItem, open_source

TRANSFORMS = ("center-crop", "center-crop-wide", "center-crop-dhariwal")

# ----------------------------------------------------------------------------------------------------------------
# Geometry: resize, center-crop, center-crop-wide, center-crop-dhariwal.


def _resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize uint8 ``[H, W, C]`` with PIL's Lanczos filter, as the official tool does."""
    if array.shape[:2] == (height, width):
        return array
    image = PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    return image_to_array(image.resize((width, height), PIL.Image.Resampling.LANCZOS))


def _crop_to_aspect(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """The largest centered crop whose aspect ratio is ``width:height`` (a square when they are equal)."""
    h, w = array.shape[:2]
    if w * height > h * width:
        crop_w = max(1, round(h * width / height))
        left = (w - crop_w) // 2
        return array[:, left:left + crop_w]
    crop_h = max(1, round(w * height / width))
    top = (h - crop_h) // 2
    return array[top:top + crop_h]


def _center_crop_dhariwal(array: np.ndarray, size: int) -> np.ndarray:
    """ADM's ImageNet preprocessing (Dhariwal & Nichol 2021), which EDM2 uses for ImageNet-512: halve the image with a
    box filter while its short side is at least ``2 size``, scale it bicubically so that the short side is ``size``
    (each side rounded), then cut out the centered ``size x size`` square."""
    image = PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=PIL.Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=PIL.Image.Resampling.BICUBIC)
    array = image_to_array(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


@dataclass(frozen=True)
class Geometry:
    """What happens to each image's size: nothing, a resize, or a centered crop and then a resize.

    - no transform: resize to ``width x height`` when a resolution is given and the image differs;
    - ``center-crop``: crop the center to the output's aspect ratio (square for NxN), then resize;
    - ``center-crop-wide``: crop the center to the wide ``width:height`` aspect, resize, then pad with black
      rows above and below to a ``width x width`` square (the official treatment of wide images, e.g. LSUN cars);
    - ``center-crop-dhariwal``: ADM's ImageNet crop (``_center_crop_dhariwal``), for square outputs.
    """

    transform: str | None = None
    width: int | None = None
    height: int | None = None

    def __post_init__(self) -> None:
        if self.transform not in (None, *TRANSFORMS):
            raise DatasetError(f"--transform={self.transform}: unknown; use one of {', '.join(TRANSFORMS)}")
        if self.transform is not None and self.width is None:
            raise DatasetError(f"--transform={self.transform} needs an output size; add --resolution=WxH, "
                               f"e.g. --resolution=64x64")
        if self.transform == "center-crop-wide" and self.width < self.height:
            raise DatasetError(f"--transform=center-crop-wide needs a wide --resolution (width >= height), "
                               f"e.g. 512x384; got {self.width}x{self.height}")
        if self.transform == "center-crop-dhariwal" and self.width != self.height:
            raise DatasetError(f"--transform=center-crop-dhariwal makes squares; give --resolution=NxN, got "
                               f"{self.width}x{self.height}")

    def apply(self, array: np.ndarray) -> np.ndarray:
        if self.width is None:
            return array
        if self.transform is None:
            return _resize(array, self.width, self.height)
        if self.transform == "center-crop-dhariwal":
            return _center_crop_dhariwal(array, self.width)
        array = _resize(_crop_to_aspect(array, self.width, self.height), self.width, self.height)
        if self.transform == "center-crop":
            return array
        canvas = np.zeros([self.width, self.width, array.shape[2]], dtype=np.uint8)
        top = (self.width - self.height) // 2
        canvas[top:top + self.height] = array
        return canvas


def parse_resolution(text: str) -> tuple[int, int]:
    """``'64x64'`` -> ``(64, 64)`` (width, height)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise DatasetError(f"--resolution={text}: expected WIDTHxHEIGHT in pixels, e.g. --resolution=64x64")
    return int(parts[0]), int(parts[1])


# ----------------------------------------------------------------------------------------------------------------
# Converting one image (in a worker process).


@dataclass
class Converted:
    name: str  # where the image came from, for messages
    label: Any
    png: bytes | None = None
    shape: tuple[int, int, int] | None = None
    error: str | None = None


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of uint8 ``[H, W, C]``, uncompressed (compress_level=0) like the official tool: fast to write
    and to decode during training."""
    buf = io.BytesIO()
    PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buf, format="png",
                                                                                compress_level=0)
    return buf.getvalue()


@dataclass
class ImageConverter:
    """Decode, transform and encode one SourceItem; a failure becomes ``Converted.error``, not an exception,
    so one bad file does not stop a worker pool."""

    store: FileStore | None
    geometry: Geometry

    def decode(self, item: SourceItem) -> np.ndarray:
        if item.array is not None:
            return item.array
        if item.data is not None:
            try:
                with PIL.Image.open(io.BytesIO(item.data)) as image:
                    return image_to_array(image)
            except (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError) as e:
                raise DatasetError(f"{item.name}: not a readable image ({e}); replace or remove it") from None
        return self.store.read_image(item.name)

    def __call__(self, item: SourceItem) -> Converted:
        from_store = item.array is None and item.data is None
        where = self.store.location(item.name) if from_store else item.name
        try:
            array = self.geometry.apply(self.decode(item))
            return Converted(where, item.label, encode_png(array), tuple(array.shape))
        except DatasetError as e:
            return Converted(where, item.label, error=str(e))


_worker_converter: ImageConverter | None = None  # set once in each pool process by _init_worker


def _init_worker(converter: ImageConverter) -> None:
    global _worker_converter
    _worker_converter = converter


def _convert_in_worker(item: SourceItem) -> Converted:
    return _worker_converter(item)


def _parallel_map(converter: ImageConverter, items: Iterable[SourceItem], workers: int) -> Iterator[Converted]:
    """``map(converter, items)`` in order, on ``workers`` processes, holding at most two batches in memory
    (Pool.imap would read the whole source ahead into its queue)."""
    if workers <= 1:
        yield from map(converter, items)
        return
    batch = 64 * workers
    iterator = iter(items)
    # Spawned, not forked: this process has imported torch (its threads), and a forked pool once hung for good
    # converting 16 images (workers exited, the parent waiting on a lock), which stalled the test suite.
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(converter,)) as pool:
        pending = pool.map_async(_convert_in_worker, list(itertools.islice(iterator, batch)), chunksize=16)
        while pending is not None:
            next_items = list(itertools.islice(iterator, batch))
            following = pool.map_async(_convert_in_worker, next_items, chunksize=16) if next_items else None
            yield from pending.get()
            pending = following


# ----------------------------------------------------------------------------------------------------------------
# Writing: a ZIP or a folder, atomically.


def archive_name(index: int) -> str:
    """``00000/img00000000.png``: subfolders of 1000 images, as the official tool names them."""
    return f"{index // 1000:05d}/img{index:08d}.png"


class DatasetWriter:
    """Writes files to a temporary ZIP or folder beside ``dest``; ``commit`` renames it to ``dest``."""

    def __init__(self, dest: str) -> None:
        self.dest = dest
        self.is_zip = dest.lower().endswith(".zip")
        parent = os.path.dirname(os.path.abspath(dest))
        os.makedirs(parent, exist_ok=True)
        prefix = "." + os.path.basename(os.path.normpath(dest)) + "."
        if self.is_zip:
            fd, self.tmp = tempfile.mkstemp(dir=parent, prefix=prefix, suffix=".tmp")
            os.close(fd)
            self._zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED)
        else:
            self.tmp = tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=".tmp")

    def add(self, name: str, data: bytes) -> None:
        if self.is_zip:
            # A fixed timestamp makes the ZIP a function of its contents alone.
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            self._zip.writestr(info, data, compress_type=zipfile.ZIP_STORED)
        else:
            path = os.path.join(self.tmp, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)

    def commit(self) -> None:
        if self.is_zip:
            self._zip.close()
        # mkstemp/mkdtemp create private (0600/0700) paths; give the result the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, (0o666 if self.is_zip else 0o777) & ~umask)
        if os.path.exists(self.dest):
            raise DatasetError(f"--dest={self.dest} appeared while converting; remove it and run again")
        os.replace(self.tmp, self.dest)

    def abort(self) -> None:
        if self.is_zip:
            self._zip.close()
        if os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)


# ----------------------------------------------------------------------------------------------------------------
# The conversion.


@dataclass
class ConversionSummary:
    dest: str
    num_images: int
    num_skipped: int
    image_shape: tuple[int, int, int]  # [H, W, C]
    num_classes: int | None
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        h, w, c = self.image_shape
        labels = f", {self.num_classes} classes" if self.num_classes else ", no labels"
        skipped = f"; skipped {self.num_skipped} unreadable files" if self.num_skipped else ""
        return f"Wrote {self.num_images} images ({w}x{h}, {c} channel{'s' * (c > 1)}{labels}) to {self.dest}{skipped}"


def _check_shape(result: Converted, first_shape: tuple[int, int, int] | None, has_resolution: bool) -> None:
    h, w, c = result.shape
    if first_shape is None:
        if c not in (1, 3):
            raise DatasetError(f"{result.name}: {c} channels; images must be grayscale or RGB")
        if h != w:
            raise DatasetError(f"{result.name}: {w}x{h} is not square, which training needs; add "
                               f"--resolution=NxN with --transform=center-crop (or center-crop-wide)")
        return
    if result.shape[:2] != first_shape[:2]:
        fix = "use --transform=center-crop with it" if has_resolution else "add --resolution=WxH to resize all"
        raise DatasetError(f"{result.name}: {w}x{h} but the first image is {first_shape[1]}x{first_shape[0]}; "
                           f"{fix}")
    if c != first_shape[2]:
        kinds = {1: "grayscale", 3: "RGB"}
        raise DatasetError(f"{result.name}: {kinds[c]} but the first image is {kinds[first_shape[2]]}; convert the "
                           f"source images to one kind")


def labels_json(labels: list[tuple[str, Any]]) -> tuple[bytes, int | None]:
    """The dataset.json text and the number of classes (None without class labels)."""
    values = [label for _name, label in labels]
    if not values or any(v is None for v in values):
        return json.dumps({"labels": None}).encode(), None
    num_classes = max(values) + 1 if all(isinstance(v, int) for v in values) else None
    return json.dumps({"labels": [[name, label] for name, label in labels]}).encode(), num_classes


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


@dataclass
class _Written:
    labels: list[tuple[str, Any]] = field(default_factory=list)  # (archive name, label) per image written
    skipped: list[str] = field(default_factory=list)  # error messages of the images left out
    first_shape: tuple[int, int, int] | None = None


def _write_images(results: Iterable[Converted], writer: DatasetWriter, bar: tqdm, total: int, skip_bad: bool,
                  has_resolution: bool, log: Callable[[str], None] | None) -> _Written:
    """Write converted images in order as ``00000/img00000000.png``, ... until ``total`` are written."""
    written = _Written()
    for result in results:
        if result.error is not None:
            if not skip_bad:
                raise DatasetError(result.error + " (or pass --skip-bad to leave such files out)")
            written.skipped.append(result.error)
            if log is not None:
                log(f"skipped: {result.error}")
            continue
        _check_shape(result, written.first_shape, has_resolution)
        written.first_shape = written.first_shape or result.shape
        name = archive_name(len(written.labels))
        writer.add(name, result.png)
        written.labels.append((name, result.label))
        bar.update(1)
        if len(written.labels) == total:
            break
    return written


def convert_dataset(source: str, dest: str, max_images: int | None = None, transform: str | None = None,
                    resolution: tuple[int, int] | None = None, workers: int | None = None,
                    skip_bad: bool = False, progress: bool = True,
                    log: Callable[[str], None] | None = None, first_image: int = 0) -> ConversionSummary:
    """Convert ``source`` into a dataset at ``dest`` (a ``.zip`` or a folder that must not exist yet).

    ``resolution`` is (width, height); ``transform`` one of TRANSFORMS (see Geometry). With ``skip_bad``
    unreadable images are left out and counted; otherwise the first one stops the conversion with a
    DatasetError naming it. ``first_image`` skips that many source images first (for held-out splits:
    ``max_images=N`` gives one part, ``first_image=N`` the rest). Decoding and resizing run on ``workers`` processes; images keep their order.
    Raises DatasetError (one line naming the file and the fix) on bad input; ``dest`` is then not created.
    """
    if os.path.exists(dest):
        raise DatasetError(f"--dest={dest} already exists; remove it or choose another path")
    if max_images is not None and max_images < 1:
        raise DatasetError(f"--max-images={max_images}: must be at least 1")
    if first_image < 0:
        raise DatasetError(f"--first={first_image}: must be 0 or more")
    geometry = Geometry(transform, *(resolution or (None, None)))
    src = open_source(source, resolution)
    if src.count == 0:
        raise DatasetError(f"--source={source}: no images found; point it at a folder or file of images")
    if first_image >= src.count:
        raise DatasetError(f"--first={first_image}: --source={source} has only {src.count} images")
    total = src.count - first_image if max_images is None else min(src.count - first_image, max_images)
    workers = default_workers() if workers is None else workers
    if src.decoded and geometry.width is None:
        workers = 1  # only PNG encoding is left to do, and sending the pixels to workers costs more than it saves

    writer = DatasetWriter(dest)
    items = itertools.islice(src.items, first_image, None)
    results = _parallel_map(ImageConverter(src.store, geometry), items, workers)
    bar = tqdm(total=total, unit="img", disable=not progress, desc=os.path.basename(dest))
    try:
        written = _write_images(results, writer, bar, total, skip_bad, resolution is not None, log)
        if not written.labels:
            raise DatasetError(f"--source={source}: none of its {len(written.skipped)} images could be read")
        metadata, num_classes = labels_json(written.labels)
        writer.add(DATASET_JSON, metadata)
        writer.commit()
    except BaseException:
        bar.leave = False  # so that the error message is the last line on the terminal
        writer.abort()
        raise
    finally:
        bar.close()
        results.close()  # stops the worker pool, also after an early stop at max_images
        if src.store is not None:
            src.store.close()
    return ConversionSummary(dest, len(written.labels), len(written.skipped), written.first_shape, num_classes,
                             written.skipped)
