"""InfoPro (Wang et al. 2021): reconstruct the input image and classify, from each hidden block.

Two auxiliary nets on the block output h [B, C, H, W]:

* **Decoder:** bilinear upsampling of h to the image size (``align_corners=True``, as a
  matrix product whose CUDA backward is deterministic: ``BilinearUpsample``),
  conv3x3(C -> 12)-BN-ReLU, conv3x3(12 -> image channels), sigmoid; loss = binary
  cross-entropy, in float32 outside autocast (CUDA autocast refuses it), against the input
  image in [0, 1]: un-normalised with the dataset's mean and std (x std + mean, as the
  authors), or, with ``rule.infopro_target = "minmax"``, rescaled per sample and channel by
  its min and max.
* **Classifier** ("1c2f"): conv3x3(C -> C')-BN-ReLU, global average pool,
  Linear(C', ``rule.aux_feature_dim``)-ReLU, Linear(-> classes), with C' = min(2C, the model's
  widest conv) (16 -> 32, 32 -> 64, 64 -> 64 on ResNet-32, as in Ma et al. 2024, table 6); the
  conv has stride 2 where it widens (C' > C), stride 1 else, as the authors' code.

loss = lambda_1 BCE + lambda_2 CE, where for hidden block i of K local blocks the weights are
interpolated linearly: lambda = first (1 - i / (K - 2)) + last i / (K - 2), from
``rule.infopro_recon`` and ``rule.infopro_ce`` (first, last).

The rule needs the model's input image at every block: the engine passes it to
``LocalBlock.train_step``; a pipeline carries it along with the activation.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelocal.config import RuleConfig
from pipelocal.models.resample import BilinearUpsample
from pipelocal.rules.auxnet import conv_shape
from pipelocal.rules.base import LocalRule, register_rule
from pipelocal.rules.context import RuleContext

__all__ = ["InfoProRule", "infopro_weights", "unit_range", "unnormalise"]


def infopro_weights(i: int, num_layers: int, cfg: RuleConfig) -> tuple[float, float]:
    """(lambda_1, lambda_2) of hidden block ``i`` of ``num_layers`` = K local blocks."""
    ratio = i / (num_layers - 2) if num_layers > 2 else 0.0
    recon = cfg.infopro_recon[0] * (1 - ratio) + cfg.infopro_recon[1] * ratio
    ce = cfg.infopro_ce[0] * (1 - ratio) + cfg.infopro_ce[1] * ratio
    return recon, ce


def unit_range(image: Tensor) -> Tensor:
    """[B, C, H, W] rescaled per sample and channel to [0, 1] (a constant channel -> 0)."""
    flat = image.flatten(2)  # [B, C, H*W]
    lo = flat.min(dim=2).values[..., None, None]
    hi = flat.max(dim=2).values[..., None, None]
    return (image - lo) / (hi - lo).clamp_min(1e-8)


def unnormalise(image: Tensor, stats: tuple[tuple[float, ...], tuple[float, ...]]) -> Tensor:
    """[B, C, H, W] normalised with per-channel (mean, std) -> image x std + mean, clamped to
    [0, 1]: a pixel of 1 can come back as 1 + 1e-7, and binary cross-entropy refuses targets
    outside [0, 1]."""
    mean, std = _stats_tensors(stats)
    return _unnormalise(image, mean.to(image), std.to(image))


def _unnormalise(image: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (image * std + mean).clamp_(0.0, 1.0)  # mean, std: [1, C, 1, 1] on image's device


def _stats_tensors(stats: tuple[tuple[float, ...], tuple[float, ...]]) -> tuple[Tensor, Tensor]:
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in stats)
    return mean, std  # [1, C, 1, 1] each


@register_rule("infopro")
class InfoProRule(LocalRule):
    authors_init: ClassVar[str] = "he-normal"  # the AugLocal authors' ResNet
    needs_context: ClassVar[bool] = True
    needs_image: ClassVar[bool] = True

    def __init__(
        self, shape: tuple[int, ...], num_classes: int, cfg: RuleConfig, *, context: RuleContext
    ) -> None:
        super().__init__(shape, num_classes, cfg)
        c, h, w = conv_shape(shape, "infopro")
        image_c, self.image_hw = context.image_shape[0], tuple(context.image_shape[1:])
        self.upsample = BilinearUpsample((h, w), self.image_hw)
        self.recon_weight, self.ce_weight = infopro_weights(context.index, context.num_layers,
                                                            cfg)
        self.decoder = nn.Sequential(
            nn.Conv2d(c, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
            nn.Conv2d(12, image_c, 3, padding=1), nn.Sigmoid(),
        )
        self.image_stats = context.image_stats
        if self.image_stats is not None:  # buffers: on the block's device, no copy per step
            mean, std = _stats_tensors(self.image_stats)
            self.register_buffer("image_mean", mean, persistent=False)
            self.register_buffer("image_std", std, persistent=False)
        if cfg.infopro_target == "dataset" and self.image_stats is None:
            raise ValueError(
                "rule 'infopro' un-normalises its reconstruction target with the dataset's mean "
                "and std, but none were given; pass RuleContext(..., image_stats=(mean, std)) "
                "(engine.build_blocks does) or set rule.infopro_target = \"minmax\""
            )
        c_conv = min(2 * c, max(c, context.max_channels))
        stride = 2 if c_conv > c else 1
        f = cfg.aux_feature_dim
        self.classifier = nn.Sequential(
            nn.Conv2d(c, c_conv, 3, stride, padding=1, bias=False), nn.BatchNorm2d(c_conv),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(c_conv, f), nn.ReLU(), nn.Linear(f, num_classes),
        )

    def reconstruct(self, h: Tensor) -> Tensor:
        """[B, C, H', W'] -> the decoded image [B, C_image, H, W] in (0, 1)."""
        return self.decoder(self.upsample(h))

    def target(self, image: Tensor) -> Tensor:
        """The image in [0, 1] the decoder reconstructs, from the normalised input ``image``."""
        if self.cfg.infopro_target == "minmax" or self.image_stats is None:
            return unit_range(image)
        return _unnormalise(image, self.image_mean, self.image_std)

    def loss(  # type: ignore[override]
        self, h: Tensor, y: Tensor, image: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        if image is None:
            raise ValueError(
                "rule 'infopro' reconstructs the input image, but none was given; pass "
                "image= to LocalBlock.train_step (the engine and the pipeline stages do)"
            )
        scores = self.classifier(h)  # [B, num_classes]
        decoded = self.reconstruct(h)
        # binary_cross_entropy is on CUDA autocast's banned list: float32, autocast off.
        with torch.autocast(h.device.type, enabled=False):
            recon = F.binary_cross_entropy(decoded.float(), self.target(image.float()))
        total = self.recon_weight * recon + self.ce_weight * F.cross_entropy(scores, y)
        return total, scores.detach()

    def logits(self, h: Tensor) -> Tensor | None:
        return self.classifier(h)
