"""Training losses of the paper (Section 5, Table 2): one denoising loss, three choices of
p_train(sigma) and lambda(sigma).

    loss = lambda(sigma) * || D(y + n; sigma) - y ||^2,   n ~ N(0, sigma^2 I),  sigma ~ p_train

returned per pixel (the training loop sums it and divides by the batch size). With an augmentation pipe,
y is the augmented image and the pipe's labels reach the network as ``augment_labels``.
"""

from __future__ import annotations

import torch

from torch_utils import persistence
from training.networks.precond import vp_sigma


class DenoisingLoss:
    """Eq. 2 weighted by lambda(sigma), with sigma drawn from p_train. Subclasses define both."""

    def sample_sigma(self, shape, device: torch.device) -> torch.Tensor:
        """Draw sigma ~ p_train, shaped ``shape`` (one per image: [N, 1, 1, 1])."""
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma)."""
        raise NotImplementedError

    def __call__(self, net, images: torch.Tensor, labels: torch.Tensor | None = None, augment_pipe=None) -> torch.Tensor:
        sigma = self.sample_sigma([images.shape[0], 1, 1, 1], images.device)
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        n = torch.randn_like(y) * sigma
        D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
        return self.weight(sigma) * ((D_yn - y) ** 2)


@persistence.persistent_class
class VPLoss(DenoisingLoss):
    """Table 1 'VP': sigma = sigma_VP(t), t ~ U(epsilon_t, 1); lambda = 1/sigma^2."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5):
        self.beta_d, self.beta_min, self.epsilon_t = beta_d, beta_min, epsilon_t

    def sample_sigma(self, shape, device):
        t = 1 + torch.rand(shape, device=device) * (self.epsilon_t - 1)
        return vp_sigma(t, self.beta_d, self.beta_min)

    def weight(self, sigma):
        return 1 / sigma ** 2


@persistence.persistent_class
class VELoss(DenoisingLoss):
    """Table 1 'VE': ln(sigma) ~ U(ln sigma_min, ln sigma_max); lambda = 1/sigma^2."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sample_sigma(self, shape, device):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** torch.rand(shape, device=device)

    def weight(self, sigma):
        return 1 / sigma ** 2


@persistence.persistent_class
class EDMLoss(DenoisingLoss):
    """Table 1 'EDM': ln(sigma) ~ N(P_mean, P_std^2); lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,
    which is 1 / c_out^2, so the loss seen by F has unit weight at every sigma (Eq. 8)."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def sample_sigma(self, shape, device):
        return (torch.randn(shape, device=device) * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2


@persistence.persistent_class
class EDM2Loss(EDMLoss):
    """EDM2 (Karras et al., CVPR 2024, Eq. 21): EDM's p_train and lambda(sigma) (defaults P_mean = -0.4,
    P_std = 1.0), with the per-image loss weighted by a learned uncertainty u(sigma) that the network returns as
    ``logvar``:

        loss = lambda(sigma) / exp(u(sigma)) * ||D(y + n; sigma) - y||^2 + u(sigma),

    per pixel (u broadcast), so the network's own estimate of its error evens out the loss over sigma."""

    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_data: float = 0.5):
        super().__init__(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)

    def __call__(self, net, images: torch.Tensor, labels: torch.Tensor | None = None, augment_pipe=None) -> torch.Tensor:
        sigma = self.sample_sigma([images.shape[0], 1, 1, 1], images.device)
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        n = torch.randn_like(y) * sigma
        # The EDM2 networks take no augmentation labels; they are passed only when there are some.
        extra = {} if augment_labels is None else dict(augment_labels=augment_labels)
        D_yn, logvar = net(y + n, sigma, labels, return_logvar=True, **extra)
        return self.weight(sigma) / logvar.exp() * ((D_yn - y) ** 2) + logvar
