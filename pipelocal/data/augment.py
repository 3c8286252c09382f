"""Batched training augmentations on float images in [0, 1], before normalisation.

Working before normalisation makes the zero fill of the translations and of cutout black, as in
torchvision's ``RandomCrop(padding=...)`` followed by ``Normalize``. Every random draw comes from
the generator passed in (one per batch, see :mod:`pipelocal.data.loader`), never from the
global RNG, so a batch's augmentation is a pure function of that generator's seed.

``x`` may live on any device: the random numbers are always drawn on CPU from that generator
(the same draws wherever the batch is built) and then moved to ``x.device``, where the rest is
exact index arithmetic, copies and fills.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipelocal.config import AUGMENTATIONS

__all__ = ["AUGMENTATIONS", "apply_augmentations", "cutout", "random_flip", "random_translate"]


def random_translate(
    x: torch.Tensor, px: int, generator: torch.Generator, mode: str = "zeros"
) -> torch.Tensor:
    """Pad by ``px`` and crop back to H x W at a random offset per sample.

    The content of sample ``b`` moves by ``(px - oy[b], px - ox[b])`` pixels, i.e. by at most
    ``px`` in each direction; the crops are gathered with index arithmetic, no per-sample loop.
    ``mode``: the padding, ``zeros`` (torchvision's ``RandomCrop(padding=px)``) or ``reflect``
    (mirrored without repeating the edge, ``F.pad(mode="reflect")``).
    """
    if px == 0:
        return x
    n, c, h, w = x.shape
    dev = x.device
    if mode == "reflect" and px >= min(h, w):
        raise ValueError(f"reflect padding by {px} px needs images larger than {px} px, got "
                         f"{h}x{w}; lower data.pad_px or set data.pad_mode = \"zeros\"")
    padded = F.pad(x, (px, px, px, px), mode="constant" if mode == "zeros" else mode)
    # padded: [N, C, H+2px, W+2px]
    oy = torch.randint(0, 2 * px + 1, (n,), generator=generator).to(dev)
    ox = torch.randint(0, 2 * px + 1, (n,), generator=generator).to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # [N, 1, H, 1]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # [N, 1, 1, W]
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    return padded[batch, chan, rows, cols]  # [N, C, H, W]


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each sample left-right with probability 1/2."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)  # [N]
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def cutout(x: torch.Tensor, px: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a ``px`` x ``px`` square per sample at a random centre, clipped at the borders."""
    if px == 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=generator).to(x.device)
    cx = torch.randint(0, w, (n,), generator=generator).to(x.device)
    y0, x0 = cy - px // 2, cx - px // 2  # the square is [y0, y0 + px) x [x0, x0 + px)
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = (ys >= y0[:, None]) & (ys < (y0 + px)[:, None])  # [N, H]
    in_x = (xs >= x0[:, None]) & (xs < (x0 + px)[:, None])  # [N, W]
    mask = in_y[:, :, None] & in_x[:, None, :]  # [N, H, W]
    return x.masked_fill(mask[:, None], 0.0)


def apply_augmentations(
    x: torch.Tensor,
    names: tuple[str, ...],
    generator: torch.Generator,
    *,
    jitter_px: int,
    pad_px: int,
    cutout_px: int,
    pad_mode: str = "zeros",
) -> torch.Tensor:
    """Apply the named augmentations in the fixed order of :data:`AUGMENTATIONS`.

    The names are checked where they enter: the config and :class:`~pipelocal.data.BatchLoader`.
    """
    if "jitter" in names:
        x = random_translate(x, jitter_px, generator)
    if "flip" in names:
        x = random_flip(x, generator)
    if "padcrop" in names:
        x = random_translate(x, pad_px, generator, pad_mode)
    if "cutout" in names:
        x = cutout(x, cutout_px, generator)
    return x
