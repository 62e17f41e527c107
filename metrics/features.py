"""Detector features of many images, sharded over the processes that ``torchrun`` starts.

Images are taken in global batches of ``batch_size * world_size``; each process computes its share of
every global batch (every world_size-th item) and the shares are gathered back into item order, so
every process ends with the same features, in the same order, as a single process would compute.
Several detectors (FID's Inception, FD-DINOv2's ViT) see each image once loaded or sampled, in one pass.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from torch_utils import distributed as dist
from metrics.inception import FEATURE_DIM


def global_batches(num_items: int, batch_size: int, world_size: int) -> list[list[int]]:
    """Item indices grouped into global batches of ``batch_size * world_size`` (the last may be shorter)."""
    step = batch_size * world_size
    return [list(range(start, min(start + step, num_items))) for start in range(0, num_items, step)]


Detector = Callable[[torch.Tensor], torch.Tensor]


def compute_features(
    detector: Detector | Mapping[str, Detector],
    image_batches: Callable[[list[list[int]]], Iterator[torch.Tensor | None]],
    num_items: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "Features",
) -> np.ndarray | dict[str, np.ndarray]:
    """Features [num_items, D] float32 of items 0..num_items-1, identical on every process; D is the detector's
    ``feature_dim`` (2048 where it has none: the FID Inception). Given several detectors (name -> detector),
    each batch of images goes to each of them, and the result is name -> features.

    ``image_batches(shards)`` gets this process's list of index shards (one per global batch, possibly
    empty) and yields, for each, the uint8 images [n, C, H, W] of those items (or None for an empty shard).
    """
    from tqdm.auto import tqdm

    detectors = detector if isinstance(detector, Mapping) else {"": detector}
    rank, world_size = dist.get_rank(), dist.get_world_size()
    batches = global_batches(num_items, batch_size, world_size)
    shards = [batch[rank::world_size] for batch in batches]
    dims = {name: getattr(d, "feature_dim", FEATURE_DIM) for name, d in detectors.items()}
    features = {name: np.zeros([num_items, dim], dtype=np.float32) for name, dim in dims.items()}
    bar = tqdm(total=num_items, unit="img", desc=desc, disable=not (progress and rank == 0), leave=False)
    for batch, images in zip(batches, image_batches(shards)):
        images = images.to(device) if images is not None and len(images) else None
        for name, d in detectors.items():
            local = torch.zeros([batch_size, dims[name]], dtype=torch.float32, device=device)
            if images is not None:
                local[:len(images)] = d(images).to(torch.float32)
            gathered = dist.all_gather_cat(local).reshape(world_size, batch_size, dims[name]).cpu().numpy()
            for r in range(world_size):
                indices = batch[r::world_size]
                features[name][indices] = gathered[r, :len(indices)]
        bar.update(len(batch))
    bar.close()
    return features if isinstance(detector, Mapping) else features[""]


class _ItemsOrError(torch.utils.data.Dataset):
    """Hands a loading error back as a value, so that it reaches the user as raised, not as a worker's traceback."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int):
        try:
            return self.dataset[idx]
        except Exception as e:
            return e


def _stack_images(items: Sequence) -> torch.Tensor | Exception:
    errors = [item for item in items if isinstance(item, Exception)]
    if errors:
        return errors[0]
    return torch.from_numpy(np.stack([image for image, _label in items]))


def dataset_batches(dataset, num_workers: int = 2) -> Callable[[list[list[int]]], Iterator[torch.Tensor | None]]:
    """An ``image_batches`` for :func:`compute_features` over a dataset (``ds[i] = (uint8 [C, H, W], label)``)."""

    def batches(shards: list[list[int]]) -> Iterator[torch.Tensor | None]:
        nonempty = [shard for shard in shards if shard]
        loader = iter(torch.utils.data.DataLoader(
            _ItemsOrError(dataset), batch_sampler=nonempty, num_workers=num_workers, collate_fn=_stack_images))
        for shard in shards:
            images = next(loader) if shard else None
            if isinstance(images, Exception):
                raise images
            yield images

    return batches


def generated_batches(generate: Callable[[list[int]], torch.Tensor], seeds: Sequence[int]
                      ) -> Callable[[list[list[int]]], Iterator[torch.Tensor | None]]:
    """An ``image_batches`` over images made on the fly: ``generate(seeds) -> uint8 [n, C, H, W]``."""

    def batches(shards: list[list[int]]) -> Iterator[torch.Tensor | None]:
        for shard in shards:
            yield generate([seeds[i] for i in shard]) if shard else None

    return batches

