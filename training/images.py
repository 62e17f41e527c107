"""Pictures written to disk: uint8 images as PNGs, grids of them, and matplotlib figures. Every file is written under
a temporary name and renamed, so no half-written picture is ever seen."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import PIL.Image
import torch

from dnnlib.util import atomic_write_bytes


def to_pil(image: torch.Tensor | np.ndarray) -> PIL.Image.Image:
    """A uint8 [C, H, W] image (C = 1 or 3) as a PIL image."""
    array = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image).transpose(1, 2, 0)
    return PIL.Image.fromarray(array[:, :, 0], "L") if array.shape[2] == 1 else PIL.Image.fromarray(array, "RGB")


def save_png(path: str, image: torch.Tensor | np.ndarray) -> None:
    """Write a uint8 [C, H, W] image as a PNG, atomically."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue(), fsync=False)


def grid_layout(num_images: int) -> tuple[int, int]:
    """Rows and columns of the squarest grid that holds every image."""
    cols = max(int(math.ceil(math.sqrt(num_images))), 1)
    return int(math.ceil(num_images / cols)), cols


def image_grid(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [N, C, H, W] images as one uint8 [C, rows * H, cols * W] image, row by row (``grid_layout``); empty cells
    black."""
    images = torch.as_tensor(np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images))
    n, c, h, w = images.shape
    rows, cols = grid_layout(n)
    padded = torch.zeros([rows * cols, c, h, w], dtype=images.dtype)
    padded[:n] = images
    return padded.reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)


def save_image_grid(images: torch.Tensor | np.ndarray, path: str) -> None:
    """Write a uint8 [N, C, H, W] batch as one PNG grid (``image_grid``), atomically."""
    save_png(path, image_grid(images))


def save_figure(fig, path: str) -> None:
    """Write a matplotlib figure as a PNG atomically (folders made as needed) and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
