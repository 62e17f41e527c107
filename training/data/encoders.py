"""Pixels and latents: the space a network is trained and sampled in (EDM2, Section 5: ImageNet-512 in the latent
space of Stability's VAE, "stabilityai/sd-vae-ft-mse").

Three representations, and three maps between them:

- pixels: uint8 [N, 3, H, W], what images are;
- raw latents: what a dataset stores. For pixels the pixels themselves; for the VAE the mean and the std of its latent
  distribution, stacked on the channel axis ([N, 8, H/8, W/8] float32), so that each training batch can draw a fresh
  latent from them;
- final latents: what the network sees and makes. For pixels x / 127.5 - 1; for the VAE a latent drawn from the raw
  one, standardized per channel to ``final_mean`` and ``final_std`` by a fixed affine map.

``encode_pixels`` (pixels -> raw latents, by ``dataset_tool.py encode``), ``encode_latents`` (raw -> final latents, per
training batch on the device) and ``decode`` (final latents -> pixels, after sampling). The class names are the
official EDM2 ones (``training.encoders.StandardRGBEncoder``, ``StabilityVAEEncoder``), so the encoders of official
pickles load here, and ours in the official code; the VAE itself is never pickled, only its name.
"""

from __future__ import annotations

import os
import socket
import urllib.parse

import numpy as np
import torch

from torch_utils import persistence


DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"  # EDM2's ImageNet-512 models' VAE.


class VAEError(ValueError):
    """A VAE that cannot be loaded (diffusers missing, an unknown name or folder); one line."""


@persistence.persistent_class
class Encoder:
    """Pixels <-> latents. ``init(device)`` does any lazy set-up (loading a network) now."""

    def init(self, device: torch.device | str) -> None:
        pass

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> final latents."""
        return self.encode_latents(self.encode_pixels(x))

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def latent_channels(self, raw_channels: int) -> int:
        """Channels of the final latents for raw latents of ``raw_channels``: what the network works on."""
        return raw_channels


@persistence.persistent_class
class StandardRGBEncoder(Encoder):
    """Pixels as they are, scaled to [-1, 1] for the network (EDM's and EDM2's pixel models)."""

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)


@persistence.persistent_class
class StabilityVAEEncoder(Encoder):
    """Stability's VAE (diffusers' ``AutoencoderKL``), named by a hub name or a local folder (``vae_name``), run on
    batches of ``batch_size`` images. The raw latents' assumed per-channel mean and std (EDM2's, of ImageNet at
    512x512 with inputs in [0, 1]) define the standardization: scale = final_std / raw_std, bias = final_mean -
    raw_mean * scale, in float32."""

    def __init__(self, vae_name: str = DEFAULT_VAE, raw_mean=(5.81, 3.25, 0.12, -2.15),
                 raw_std=(4.17, 4.62, 3.71, 3.28), final_mean: float = 0, final_std: float = 0.5,
                 batch_size: int = 8):
        self.vae_name = vae_name
        self.scale = np.float32(final_std) / np.asarray(raw_std, dtype=np.float32)
        self.bias = np.float32(final_mean) - np.asarray(raw_mean, dtype=np.float32) * self.scale
        self.batch_size = int(batch_size)
        self._vae = None

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _vae=None)  # The VAE is loaded by name where the pickle is opened.

    def init(self, device: torch.device | str) -> None:
        if self._vae is None:
            self._vae = load_vae(self.vae_name, device)
        self._vae.to(device)

    def latent_channels(self, raw_channels: int) -> int:
        return raw_channels // 2

    def _per_channel(self, values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(1, -1, 1, 1)

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> raw latents [N, 8, H/8, W/8]: the VAE's latent mean and std of x / 255."""
        self.init(x.device)
        x = x.to(torch.float32) / 255
        parts = []
        for batch in x.split(self.batch_size):
            distribution = self._vae.encode(batch).latent_dist
            parts.append(torch.cat([distribution.mean, distribution.std], dim=1))
        return torch.cat(parts)

    def encode_latents(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Raw latents -> a latent drawn from N(mean, std^2) (the device's generator; the mean itself without
        ``sample``), then scale and bias."""
        mean, std = x.to(torch.float32).chunk(2, dim=1)
        x = mean + torch.randn_like(mean) * std if sample else mean
        return x * self._per_channel(self.scale, x) + self._per_channel(self.bias, x)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Final latents -> uint8 pixels: the standardization undone, the VAE's decoder, [0, 1] -> [0, 255]."""
        self.init(x.device)
        x = x.to(torch.float32)
        x = (x - self._per_channel(self.bias, x)) / self._per_channel(self.scale, x)
        images = torch.cat([self._vae.decode(batch).sample for batch in x.split(self.batch_size)])
        return images.clamp(0, 1).mul(255).to(torch.uint8)


def hub_unreachable_reason(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be asked for a download now, or None when it may be. huggingface_hub retries an
    unreachable host with back-off for about 25 s a call, so an offline machine asks it nothing: ``HF_HUB_OFFLINE``
    (read now, not when the hub library was imported), or no TCP connection to ``HF_ENDPOINT`` (default
    huggingface.co) within ``timeout`` seconds. Behind a proxy the connection is the proxy's to make: not probed."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname, endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port} cannot be reached ({e.strerror or type(e).__name__})"
    return None


def load_vae(name: str, device: torch.device | str = "cpu"):
    """``diffusers.AutoencoderKL.from_pretrained(name)`` in eval mode without gradients, on ``device``: a local folder
    (written by ``save_pretrained``) or a hub name, downloaded once into the cache folder's ``diffusers`` (local files
    first, so that a cached VAE needs no network; a hub that cannot be reached is one line at once, see
    :func:`hub_unreachable_reason`)."""
    try:
        import diffusers
    except ImportError:
        raise VAEError("latent diffusion needs the diffusers package: pip install -r requirements-extras.txt") from None
    import dnnlib

    cache_dir = dnnlib.make_cache_dir_path("diffusers")

    def load(*args, **kwargs):
        return diffusers.AutoencoderKL.from_pretrained(*args, low_cpu_mem_usage=False, **kwargs)

    advice = "give a diffusers AutoencoderKL folder or hub name"
    if os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
        name = os.path.expanduser(name)
        if not os.path.isdir(name):
            raise VAEError(f"VAE '{name}': no such folder; {advice}")
    vae = None
    if not os.path.isdir(name):
        try:
            vae = load(name, cache_dir=cache_dir, local_files_only=True)
        except (OSError, ValueError):
            offline = hub_unreachable_reason()
            if offline is not None:
                raise VAEError(f"VAE '{name}': cannot load it (not in the cache {cache_dir}, and {offline}); "
                               f"{advice}") from None
    try:
        if vae is None:
            vae = load(name) if os.path.isdir(name) else load(name, cache_dir=cache_dir)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VAEError(f"VAE '{name}': cannot load it ({first}); {advice}") from None
    return vae.eval().requires_grad_(False).to(device)
