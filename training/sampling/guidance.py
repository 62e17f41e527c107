"""Guidance: a denoiser made of two, which every sampler takes as its ``net`` without knowing about it."""

from __future__ import annotations

import torch

UNCONDITIONAL = "uncond"  # The guide of classifier-free guidance: the network itself without its label.


class GuidedDenoiser:
    """D_w(x; sigma) = D_g(x; sigma) + w (D(x; sigma) - D_g(x; sigma)) for a guiding denoiser D_g.

    ``guide`` is another network (autoguidance, Karras et al. 2024: a smaller or less-trained version of ``net``;
    or, as EDM2's classifier-free guidance presets, a separate unconditional network, called without labels)
    or ``UNCONDITIONAL`` (classifier-free guidance, Ho and Salimans 2022: ``net`` itself with a zero label
    vector, as trained with label dropout; both evaluated in one batched call). With ``interval`` = (sigma_lo,
    sigma_hi) the guidance applies only at noise levels inside it (Kynkaanniemi et al. 2024), and the guide is
    not called outside, which needs the noise level on the host (one device read per call). w = 1 is ``net``
    alone, bit for bit, and never calls the guide.

    Calls as the networks do, ``D_w(x, sigma, class_labels)``; other attributes (sigma range, ``round_sigma``,
    image shape, ``label_dim``, parameters) are those of ``net``.
    """

    def __init__(self, net, guide, weight: float, interval: tuple[float, float] | None = None):
        if isinstance(guide, str) and guide == UNCONDITIONAL:
            if not getattr(net, "label_dim", 0):
                raise ValueError("classifier-free guidance needs a class-conditional network (label_dim > 0); "
                                 "guide an unconditional one with another network (autoguidance)")
            guide = UNCONDITIONAL
        if interval is not None and not 0 <= interval[0] < interval[1]:
            raise ValueError(f"guidance interval {interval}: expected 0 <= sigma_lo < sigma_hi")
        self.net, self.guide, self.weight, self.interval = net, guide, float(weight), interval

    def __getattr__(self, name: str):
        return getattr(self.__dict__["net"], name)

    def _guided_at(self, sigma) -> bool:
        if self.weight == 1:
            return False
        if self.interval is None:
            return True
        lo, hi = self.interval
        value = float(torch.as_tensor(sigma).reshape(-1)[0])
        return lo <= value <= hi

    def __call__(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if not self._guided_at(sigma):
            return self.net(x, sigma, class_labels, **kwargs)
        if self.guide is UNCONDITIONAL:
            D, D_g = self._with_and_without_labels(x, sigma, class_labels, **kwargs)
        else:
            guide_labels = class_labels if getattr(self.guide, "label_dim", 0) else None  # EDM2's unconditional guides.
            D, D_g = self.net(x, sigma, class_labels, **kwargs), self.guide(x, sigma, guide_labels, **kwargs)
        return D_g.to(D.dtype).lerp(D, self.weight)

    def _with_and_without_labels(self, x, sigma, class_labels, **kwargs):
        """D(x; sigma, labels) and D(x; sigma, 0) from one call on the doubled batch."""
        n = x.shape[0]
        labels = torch.zeros([n, self.net.label_dim], device=x.device) if class_labels is None else \
            class_labels.to(torch.float32).reshape(-1, self.net.label_dim).expand(n, -1)
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.reshape(-1).expand(n).repeat(2) if sigma.numel() in (1, n) else sigma
        both = self.net(torch.cat([x, x]), sigma, torch.cat([labels, torch.zeros_like(labels)]), **kwargs)
        return both[:n], both[n:]


def guided(net, guide=None, weight: float = 1, interval: tuple[float, float] | None = None):
    """``net`` itself when there is nothing to guide with (no guide, or w = 1), else its ``GuidedDenoiser``."""
    if guide is None or weight == 1:
        return net
    return GuidedDenoiser(net, guide, weight, interval)

