"""The two U-Net families of the paper: ``SongUNet`` (DDPM++ and NCSN++, Song et al. 2021) and
``DhariwalUNet`` (ADM, Dhariwal & Nichol 2021). Both map (x, noise label, class label, augment label)
to an output image: they are the raw network F of Eq. 7; preconditioning lives in ``precond.py``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from torch_utils import persistence

from .layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock


# Initializations of DDPM++/NCSN++ (the official configs): Xavier everywhere, output layers scaled to start near zero.
_XAVIER = dict(init_mode="xavier_uniform")
_XAVIER_NEAR_ZERO = dict(init_mode="xavier_uniform", init_weight=1e-5)
# Of ADM: uniform Kaiming scaled by sqrt(1/3) for weights and biases; output layers start at exactly zero.
_KAIMING_THIRD = dict(init_mode="kaiming_uniform", init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
_KAIMING_ZERO = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)


def _drop_labels(class_labels: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Classifier-free-guidance style label dropout: zero each image's label with probability p."""
    if training and p:
        keep = (torch.rand([class_labels.shape[0], 1], device=class_labels.device) >= p).to(class_labels.dtype)
        class_labels = class_labels * keep
    return class_labels


class _LevelUNet(torch.nn.Module):
    """What DDPM++/NCSN++ and ADM share: resolution levels named '{res}x{res}', walked the same way.

    Encoder, per level from the finest: an entry layer (the stem convolution at level 0, a downsampling block
    below it), then ``num_blocks`` blocks. Decoder, per level from the coarsest: an entry (two blocks at the
    bottom, an upsampling block above it), then ``num_blocks + 1`` blocks, each of which takes the
    most recent unused encoder activation (every encoder output is kept, in order) concatenated to its
    input. Subclasses add to each level an image path (``_add_image_input`` / ``_image_input``) and an output
    head (``_add_output`` / ``_output``); the module names are those of the official checkpoints.
    """

    def _build_levels(self, img_resolution: int, in_channels: int, stem_channels: int, widths: Sequence[int],
                      num_blocks: int, make_block, uses_attention, stem_init: dict) -> None:
        """``make_block(cin, cout, **kwargs)`` makes a UNetBlock; ``uses_attention(part, res, index)`` with part
        'enc' | 'dec' says whether a level's ``index``-th block has self-attention."""
        self.level_names = [f"{img_resolution >> level}x{img_resolution >> level}" for level in range(len(widths))]
        self.num_blocks = num_blocks
        self.enc = torch.nn.ModuleDict()
        self.dec = torch.nn.ModuleDict()
        saved_widths = []  # Channels of each encoder output the decoder will concatenate, in order.
        width, image_width = stem_channels, in_channels
        for level, (name, level_width) in enumerate(zip(self.level_names, widths)):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{name}_conv"] = Conv2d(in_channels, stem_channels, kernel=3, **stem_init)
            else:
                self.enc[f"{name}_down"] = make_block(width, width, down=True)
                image_width = self._add_image_input(name, image_width, width)
            saved_widths.append(width)
            for index in range(num_blocks):
                self.enc[f"{name}_block{index}"] = make_block(width, level_width,
                                                              attention=uses_attention("enc", res, index))
                width = level_width
                saved_widths.append(width)
        for level in reversed(range(len(widths))):
            name, res = self.level_names[level], img_resolution >> level
            if level == len(widths) - 1:
                self.dec[f"{name}_in0"] = make_block(width, width, attention=True)
                self.dec[f"{name}_in1"] = make_block(width, width)
            else:
                self.dec[f"{name}_up"] = make_block(width, width, up=True)
            for index in range(num_blocks + 1):
                self.dec[f"{name}_block{index}"] = make_block(width + saved_widths.pop(), widths[level],
                                                              attention=uses_attention("dec", res, index))
                width = widths[level]
            self._add_output(level, name, width)

    def _add_image_input(self, name: str, image_width: int, width: int) -> int:
        return image_width

    def _image_input(self, name: str, x: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, image

    def _add_output(self, level: int, name: str, width: int) -> None:
        raise NotImplementedError

    def _output(self, level: int, name: str, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor | None:
        raise NotImplementedError

    def embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
              augment_labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """F(x; noise label): embedding (kept in float32, as the official), encoder, decoder."""
        emb = self.embed(noise_labels, class_labels, augment_labels)
        x, saved = self._encode(x, emb)
        return self._decode(x, emb, saved)

    def _encode(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        image, saved = x, []
        for level, name in enumerate(self.level_names):
            if level == 0:
                x = self.enc[f"{name}_conv"](x)
            else:
                x, image = self._image_input(name, self.enc[f"{name}_down"](x, emb), image)
            saved.append(x)
            for index in range(self.num_blocks):
                x = self.enc[f"{name}_block{index}"](x, emb)
                saved.append(x)
        return x, saved

    def _decode(self, x: torch.Tensor, emb: torch.Tensor, saved: list[torch.Tensor]) -> torch.Tensor:
        out = None
        for level in reversed(range(len(self.level_names))):
            name = self.level_names[level]
            if level == len(self.level_names) - 1:
                x = self.dec[f"{name}_in1"](self.dec[f"{name}_in0"](x, emb), emb)
            else:
                x = self.dec[f"{name}_up"](x, emb)
            for index in range(self.num_blocks + 1):
                x = self.dec[f"{name}_block{index}"](torch.cat([x, saved.pop()], dim=1), emb)
            out = self._output(level, name, x, out)
        return out


@persistence.persistent_class
class SongUNet(_LevelUNet):
    """DDPM++ (``embedding_type='positional'``, ``encoder_type='standard'``) and NCSN++ (``'fourier'``,
    ``'residual'``, ``resample_filter=[1,3,3,1]``) architectures, with every option of the official code.

    encoder_type: 'standard' | 'skip' (progressive input, added after each downsampling) |
                  'residual' (progressive input, residual-averaged). decoder_type: 'standard' | 'skip'
                  (progressive output, summed over resolutions).
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[float] = (1, 1)):
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"embedding_type='{embedding_type}': expected 'positional' or 'fourier'")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type='{encoder_type}': expected 'standard', 'skip' or 'residual'")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type='{decoder_type}': expected 'standard' or 'skip'")
        super().__init__()
        self.label_dropout = label_dropout
        self.encoder_type = encoder_type
        self.decoder_type = decoder_type
        self.out_channels = out_channels
        self.resample_filter = list(resample_filter)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise

        # Mapping of noise level, class label and augmentation label to the embedding.
        self.map_noise = (PositionalEmbedding(num_channels=noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(num_channels=noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **_XAVIER) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **_XAVIER) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **_XAVIER)
        self.map_layer1 = Linear(emb_channels, emb_channels, **_XAVIER)

        def make_block(cin: int, cout: int, **kwargs) -> UNetBlock:
            return UNetBlock(cin, cout, emb_channels=emb_channels, num_heads=1, dropout=dropout,
                             skip_scale=np.sqrt(0.5), eps=1e-6, resample_filter=resample_filter, resample_proj=True,
                             adaptive_scale=False, init=_XAVIER, init_zero=_XAVIER_NEAR_ZERO,
                             init_attn=dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2)), **kwargs)

        def uses_attention(part: str, res: int, index: int) -> bool:
            # Decoder levels attend only in their last block.
            return res in attn_resolutions and (part == "enc" or index == num_blocks)

        self._build_levels(img_resolution, in_channels, model_channels, [model_channels * m for m in channel_mult],
                           num_blocks, make_block, uses_attention, _XAVIER)

    def _add_image_input(self, name: str, image_width: int, width: int) -> int:
        """Progressive input (encoder 'skip' / 'residual'): the image, downsampled level by level, joins x."""
        if self.encoder_type == "skip":
            self.enc[f"{name}_aux_down"] = Conv2d(image_width, image_width, kernel=0, down=True,
                                                  resample_filter=self.resample_filter)
            self.enc[f"{name}_aux_skip"] = Conv2d(image_width, width, kernel=1, **_XAVIER)
        elif self.encoder_type == "residual":
            self.enc[f"{name}_aux_residual"] = Conv2d(image_width, width, kernel=3, down=True,
                                                      resample_filter=self.resample_filter, fused_resample=True,
                                                      **_XAVIER)
            return width
        return image_width

    def _image_input(self, name: str, x: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.encoder_type == "skip":
            image = self.enc[f"{name}_aux_down"](image)
            return x + self.enc[f"{name}_aux_skip"](image), image
        if self.encoder_type == "residual":
            x = (x + self.enc[f"{name}_aux_residual"](image)) / np.sqrt(2)
            return x, x
        return x, image

    def _add_output(self, level: int, name: str, width: int) -> None:
        """Output head (GroupNorm-SiLU-Conv) at the finest level; with decoder 'skip' at every level, the coarser
        outputs upsampled and summed (progressive output)."""
        if self.decoder_type == "skip" or level == 0:
            if self.decoder_type == "skip" and level < len(self.level_names) - 1:
                self.dec[f"{name}_aux_up"] = Conv2d(self.out_channels, self.out_channels, kernel=0, up=True,
                                                    resample_filter=self.resample_filter)
            self.dec[f"{name}_aux_norm"] = GroupNorm(num_channels=width, eps=1e-6)
            self.dec[f"{name}_aux_conv"] = Conv2d(width, self.out_channels, kernel=3, **_XAVIER_NEAR_ZERO)

    def _output(self, level: int, name: str, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor | None:
        if self.decoder_type != "skip" and level != 0:
            return out
        if out is not None:
            out = self.dec[f"{name}_aux_up"](out)
        head = self.dec[f"{name}_aux_conv"](F.silu(self.dec[f"{name}_aux_norm"](x)))
        return head if out is None else head + out

    def embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
              augment_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [cos, sin] -> [sin, cos], as trained.
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))


@persistence.persistent_class
class DhariwalUNet(_LevelUNet):
    """ADM architecture (Dhariwal & Nichol 2021), as used for ImageNet-64 in the paper."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        # Embedding: positional noise features (+ augmentation labels, mapped from zero), a two-layer MLP, and the
        # class embedding added after it.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **_KAIMING_ZERO) if augment_dim else None
        self.map_layer0, self.map_layer1 = (Linear(model_channels, emb_channels, **_KAIMING_THIRD),
                                            Linear(emb_channels, emb_channels, **_KAIMING_THIRD))
        self.map_label = None
        if label_dim:
            self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                    init_weight=np.sqrt(label_dim))

        def make_block(cin: int, cout: int, **kwargs) -> UNetBlock:
            return UNetBlock(cin, cout, emb_channels=emb_channels, channels_per_head=64, dropout=dropout,
                             init=_KAIMING_THIRD, init_zero=_KAIMING_ZERO, **kwargs)

        widths = [model_channels * m for m in channel_mult]
        self._build_levels(img_resolution, in_channels, widths[0], widths, num_blocks, make_block,
                           lambda part, res, index: res in attn_resolutions, _KAIMING_THIRD)
        self.out_norm = GroupNorm(num_channels=widths[0])
        self.out_conv = Conv2d(widths[0], out_channels, kernel=3, **_KAIMING_ZERO)

    def _add_output(self, level: int, name: str, width: int) -> None:
        pass  # One output head, after the decoder (out_norm, out_conv).

    def _output(self, level: int, name: str, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor | None:
        return self.out_conv(F.silu(self.out_norm(x))) if level == 0 else None

    def embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
              augment_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training))
        return F.silu(emb)
