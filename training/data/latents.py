"""Datasets of latents: images encoded by Stability's VAE (``dataset_tool.py encode``), and back (``decode``).

``encode_dataset`` writes the official EDM2 layout: one raw latent (the VAE's latent mean and std of an image,
float32 ``[8, H/8, W/8]``, see ``encoders``) per image as ``00000/img-mean-std-00000000.npy``, labels in
``dataset.json`` as for images. The VAE runs on batches on the chosen device (the official tool encodes one image at a
time, on CUDA only). ``decode_dataset`` turns such a dataset back into images (each latent's mean, decoded), to see
what a dataset of latents holds. Both write atomically, as conversion does (``convert.DatasetWriter``).
"""

from __future__ import annotations

import io
import itertools
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from training.data.convert import DatasetWriter, Geometry, ImageConverter, archive_name, encode_png, labels_json
from training.data.dataset import DATASET_JSON, DatasetError, ImageFolderDataset
from training.data.encoders import DEFAULT_VAE, StabilityVAEEncoder
from training.data.sources import SourceItem, open_source



def latent_archive_name(index: int) -> str:
    """``00000/img-mean-std-00000000.npy``: the official EDM2 name of image ``index``'s raw latent."""
    return f"{index // 1000:05d}/img-mean-std-{index:08d}.npy"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


@dataclass
class LatentSummary:
    dest: str
    num_images: int
    shape: tuple[int, ...]  # What each file holds: [C, H, W] latents or [H, W, C] pixels.
    num_classes: int | None
    what: str  # 'latents' or 'images'

    def __str__(self) -> str:
        labels = f", {self.num_classes} classes" if self.num_classes else ", no labels"
        return f"Wrote {self.num_images} {self.what} ({'x'.join(map(str, self.shape))}{labels}) to {self.dest}"


def _check_dest(dest: str) -> None:
    if os.path.exists(dest):
        raise DatasetError(f"--dest={dest} already exists; remove it or choose another path")


def _rgb_batches(source: str, first_image: int, max_images: int | None, batch: int
                 ) -> tuple[int, Iterator[list[tuple[np.ndarray, object]]], object]:
    """(image count, batches of (uint8 RGB [H, W, 3], label), the source's file store) of an image source."""
    if (os.path.isdir(source) or source.lower().endswith(".zip")) and _holds_latents(source):
        raise DatasetError(f"--source={source}: a dataset of latents already; encode takes images")
    src = open_source(source)
    if src.count == 0:
        raise DatasetError(f"--source={source}: no images found; point it at a folder or file of images")
    if first_image >= src.count:
        raise DatasetError(f"--first={first_image}: --source={source} has only {src.count} images")
    total = src.count - first_image if max_images is None else min(src.count - first_image, max_images)
    converter = ImageConverter(src.store, Geometry())

    def rgb(item: SourceItem) -> tuple[np.ndarray, object]:
        array = converter.decode(item)
        return (np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array), item.label

    items = map(rgb, itertools.islice(src.items, first_image, first_image + total))
    batches = iter(lambda: list(itertools.islice(items, batch)), [])
    return total, batches, src.store


def _holds_latents(path: str) -> bool:
    try:
        dataset = ImageFolderDataset(path)
    except DatasetError:
        return False
    try:
        return dataset.is_latent
    finally:
        dataset.close()


def write_dataset(dest: str, batches: Iterator[list[tuple[str, bytes, object]]], total: int,
                  progress: bool = True) -> tuple[int, int | None]:
    """Write ``batches`` of (archive name, file bytes, label) and then ``dataset.json`` to ``dest``, atomically: on any
    error, or an interrupt, nothing is left there. Returns (files written, classes)."""
    writer = DatasetWriter(dest)
    labels = []
    bar = tqdm(total=total, unit="img", disable=not progress, desc=os.path.basename(dest))
    try:
        for batch in batches:
            for name, data, label in batch:
                writer.add(name, data)
                labels.append((name, label))
            bar.update(len(batch))
        metadata, num_classes = labels_json(labels)
        writer.add(DATASET_JSON, metadata)
        writer.commit()
    except BaseException:
        bar.leave = False
        writer.abort()
        raise
    finally:
        bar.close()
    return len(labels), num_classes


def encode_dataset(source: str, dest: str, vae_name: str = DEFAULT_VAE, max_images: int | None = None,
                   first_image: int = 0, batch: int = 8, device: torch.device | str = "cpu",
                   progress: bool = True) -> LatentSummary:
    """Encode the images of ``source`` (any source ``dataset_tool.py`` converts; grayscale becomes RGB) into a dataset
    of raw latents at ``dest`` (a .zip or a folder that must not exist). Images must be square, of a size the VAE
    divides (8 for Stability's). Raises DatasetError or ``encoders.VAEError`` with one line; ``dest`` is then not
    created."""
    _check_dest(dest)
    total, batches, store = _rgb_batches(source, first_image, max_images, batch)
    encoder = StabilityVAEEncoder(vae_name=vae_name, batch_size=batch)
    try:
        encoder.init(device)
    except BaseException:
        if store is not None:
            store.close()
        raise
    factor = 2 ** (len(encoder._vae.config.block_out_channels) - 1)
    first_shape, latent_shape, written = None, (), 0

    def encoded():
        nonlocal first_shape, latent_shape, written
        for images in batches:
            first_shape = first_shape or images[0][0].shape
            for array, _ in images:
                _check_encodable(array.shape, first_shape, factor, source)
            # Contiguous NCHW, as the official tool's single images are: channels-last convolutions round differently.
            pixels = torch.from_numpy(np.stack([a for a, _ in images])).permute(0, 3, 1, 2).contiguous().to(device)
            with torch.no_grad():
                latents = encoder.encode_pixels(pixels).cpu().numpy()
            latent_shape = tuple(latents.shape[1:])
            yield [(latent_archive_name(written + i), npy_bytes(latent), label)
                   for i, (latent, (_, label)) in enumerate(zip(latents, images))]
            written += len(images)

    try:
        count, num_classes = write_dataset(dest, encoded(), total, progress)
    finally:
        if store is not None:
            store.close()
    return LatentSummary(dest, count, latent_shape, num_classes, "latents")


def _check_encodable(shape: tuple[int, ...], first_shape: tuple[int, ...], factor: int, source: str) -> None:
    """Images the VAE can encode into one dataset: square, divisible by its downsampling ``factor``, of one size."""
    height, width = shape[:2]
    if shape != first_shape or height != width or height % factor:
        raise DatasetError(f"--source={source}: images must be square, of one size, divisible by {factor}; got "
                           f"{width}x{height}: convert them first, e.g. dataset_tool.py --resolution=512x512 "
                           f"--transform=center-crop")


def decode_dataset(source: str, dest: str, vae_name: str = DEFAULT_VAE, max_images: int | None = None,
                   batch: int = 8, device: torch.device | str = "cpu", progress: bool = True) -> LatentSummary:
    """Decode a dataset of raw latents (``encode_dataset``'s) into an image dataset at ``dest``: each latent's mean,
    standardized as training sees it, through the VAE's decoder, as PNGs with the same labels."""
    _check_dest(dest)
    dataset = ImageFolderDataset(source, use_labels=True)
    if not dataset.is_latent:
        dataset.close()
        raise DatasetError(f"--source={source}: a dataset of images, not latents; decode takes what encode wrote")
    total = len(dataset) if max_images is None else min(len(dataset), max_images)
    encoder = StabilityVAEEncoder(vae_name=vae_name, batch_size=batch)
    shapes = []

    def decoded():
        for start in range(0, total, batch):
            indices = range(start, min(start + batch, total))
            raw = torch.from_numpy(np.stack([dataset[i][0] for i in indices])).to(device)
            with torch.no_grad():
                images = encoder.decode(encoder.encode_latents(raw, sample=False)).permute(0, 2, 3, 1).cpu().numpy()
            shapes.append(images.shape[1:])
            yield [(archive_name(i), encode_png(image), _label_of(dataset, i)) for i, image in zip(indices, images)]

    try:
        count, num_classes = write_dataset(dest, decoded(), total, progress)
    finally:
        dataset.close()
    return LatentSummary(dest, count, tuple(shapes[-1]) if shapes else (), num_classes, "images")


def _label_of(dataset: ImageFolderDataset, index: int):
    """The label as dataset.json writes it: a class index, a list of floats, or None."""
    raw = dataset.get_details(index)["raw_label"]
    if raw.size == 0:
        return None
    return int(raw) if dataset.has_onehot_labels else raw.tolist()
