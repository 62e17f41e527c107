"""Which sampler a set of options runs, and images for seeds: what generate.py, fid.py, the EMA sweep and the training
loop's grids and metrics all call.

Sampler options arrive as one flat dict (the command lines' options, None for those not given). ``SamplerChoice.of``
decides once which sampler they name, by one rule:

- any of the registry's options (sampler, nfe, steps_schedule): a named sampler of ``registry.SAMPLERS``;
- else any option that only the Table 1 ablation sampler has (solver, discretization, schedule, scaling, alpha,
  epsilon_s, C_1, C_2, M): ``paper.ablation_sampler``;
- else the paper's ``paper.edm_sampler`` (Algorithms 1 and 2).

Options of both the registry and the ablation sampler together are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from training.sampling.paper import ablation_sampler, edm_sampler
from training.sampling.registry import get_sampler
from training.sampling.seeds import SeedRNG, draw_class_labels, draw_latents
from training.sampling.solvers import RandnLike, StepCallback
from training.sampling.time_steps import DEFAULT_NUM_STEPS

REGISTRY_OPTIONS = ("sampler", "nfe", "steps_schedule")
ABLATION_OPTIONS = ("solver", "discretization", "schedule", "scaling", "alpha", "epsilon_s", "C_1", "C_2", "M")


@dataclass(frozen=True)
class SamplerChoice:
    """The sampler that ``options`` name: ``kind`` 'edm' (``edm_sampler``), 'ablation' (``ablation_sampler``) or
    'registry' (``SAMPLERS[options['sampler']]``, default 'heun'), and the options it runs with (None dropped)."""
    kind: str
    options: dict = field(default_factory=dict)

    @classmethod
    def of(cls, sampler_kwargs: dict) -> "SamplerChoice":
        """The choice for these options (see the module docstring); a one-line ValueError for options of two
        samplers or an unknown sampler name, before any work."""
        options = {k: v for k, v in sampler_kwargs.items() if v is not None}
        registry = [k for k in REGISTRY_OPTIONS if k in options]
        ablation = [k for k in ABLATION_OPTIONS if k in options]
        if registry and ablation:
            raise ValueError(f"{', '.join(ablation)}: options of the Table 1 ablation sampler, which does not mix "
                             f"with the named samplers (sampler/nfe/steps_schedule)")
        if registry:
            get_sampler(options.get("sampler") or "heun")
            return cls("registry", options)
        return cls("ablation" if ablation else "edm", options)

    def run(self, net, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
            randn_like: RandnLike = torch.randn_like, callback: StepCallback | None = None) -> torch.Tensor:
        """Sample from ``latents`` (unit Gaussian noise [N, C, H, W]); float64 images."""
        if self.kind == "edm":
            return edm_sampler(net, latents, class_labels, randn_like, callback=callback, **self.options)
        if self.kind == "ablation":
            return ablation_sampler(net, latents, class_labels, randn_like, callback=callback, **self.options)
        options = dict(self.options)
        sampler = get_sampler(options.pop("sampler", None) or "heun")
        nfe = options.pop("nfe", None)
        num_steps = options.pop("num_steps", None)
        nfe = nfe if nfe is not None else 2 * (num_steps or DEFAULT_NUM_STEPS) - 1
        return sampler(net, latents, class_labels, randn_like=randn_like, nfe=nfe, callback=callback, **options)

    def describe(self) -> str:
        """For messages: 'edm_sampler', 'ablation_sampler' or 'NAME (NFE n, SCHEDULE steps)'."""
        if self.kind != "registry":
            return f"{self.kind}_sampler"
        name = self.options.get("sampler") or "heun"
        nfe = self.options.get("nfe") or 2 * self.options.get("num_steps", DEFAULT_NUM_STEPS) - 1
        schedule = self.options.get("steps_schedule") or get_sampler(name).steps_schedule
        return f"{name} (NFE {nfe}, {schedule} steps)"


def check_sampler_options(sampler_kwargs: dict) -> None:
    """One-line ValueErrors, before any work, for options that name no sampler (``SamplerChoice.of``)."""
    SamplerChoice.of(sampler_kwargs)


def describe_sampler(sampler_kwargs: dict) -> str:
    """What ``run_sampler`` runs with these options (``SamplerChoice.describe``)."""
    return SamplerChoice.of(sampler_kwargs).describe()


def run_sampler(net, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
                randn_like: RandnLike = torch.randn_like, callback: StepCallback | None = None,
                **sampler_kwargs) -> torch.Tensor:
    """The sampler these options name (``SamplerChoice``), run from ``latents``. Options set to None are left at the
    sampler's default."""
    return SamplerChoice.of(sampler_kwargs).run(net, latents, class_labels, randn_like, callback)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images to uint8 as saved to PNG: (x * 127.5 + 128).clip(0, 255), truncated."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


@torch.no_grad()
def generate_images(net, seeds: Sequence[int], class_idx: int | str | None = None,
                    device: torch.device | str | None = None, decode: Callable[[torch.Tensor], torch.Tensor] = to_uint8,
                    **sampler_kwargs) -> torch.Tensor:
    """Images for ``seeds`` exactly as generate.py saves them: uint8 [len(seeds), C, H, W] on ``device``
    (default: the network's). Each image depends only on its seed, the network and the sampler options. ``decode``
    turns the sampler's output into pixels: ``to_uint8`` for a network of pixels, an encoder's ``decode`` for one of
    latents (``training.data.encoders``)."""
    if len(seeds) == 0:
        raise ValueError("no seeds given")
    if device is None:
        device = next((p.device for p in net.parameters()), torch.device("cpu")) if hasattr(net, "parameters") else "cpu"
    rng = SeedRNG(seeds, device)
    latents = draw_latents(net, rng)
    class_labels = draw_class_labels(net, rng, class_idx)
    return decode(run_sampler(net, latents, class_labels, randn_like=rng.randn_like, **sampler_kwargs))
