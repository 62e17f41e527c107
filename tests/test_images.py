"""Pictures on disk (training/images.py): grids laid out row by row, PNGs that hold exactly the pixels."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

from training.images import grid_layout, image_grid, save_image_grid, save_png


def test_image_grid_places_images_row_major(tmp_path):
    images = np.stack([np.full([3, 2, 2], 10 * i, dtype=np.uint8) for i in range(5)])
    assert grid_layout(5) == (2, 3) and grid_layout(64) == (8, 8) and grid_layout(1) == (1, 1)
    grid = image_grid(images)
    assert grid.shape == (3, 4, 6) and grid.dtype == torch.uint8
    assert grid[0, 0, 4] == 20 and grid[0, 2, 0] == 30 and grid[0, 3, 5] == 0  # Unused cell: black.
    assert torch.equal(image_grid(torch.from_numpy(images)), grid)
    save_image_grid(images[:, :1], str(tmp_path / "grid.png"))
    saved = PIL.Image.open(tmp_path / "grid.png")
    assert saved.mode == "L" and np.array_equal(np.asarray(saved), grid[0].numpy())


def test_png_holds_the_pixels_and_no_temporary_file_is_left(tmp_path):
    image = torch.randint(0, 256, [3, 5, 7], dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    save_png(str(tmp_path / "x.png"), image)
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "x.png")), image.permute(1, 2, 0).numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
