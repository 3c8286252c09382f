"""A block's optimiser and its learning-rate schedule: the factory and the rate of each epoch."""

from __future__ import annotations

import bisect
import math

import torch
from torch import nn

from pipelocal.config import OptimConfig, ScheduleConfig

__all__ = ["build_optimizer", "learning_rate", "lr_factor"]


def lr_factor(cfg: ScheduleConfig, epoch: int, epochs: int) -> float:
    """Learning-rate multiplier for ``epoch`` (0-based) of ``epochs``.

    step: x gamma at each milestone: ``milestone_epochs`` if given, applied as the authors do
    (``bisect_right(milestones, epoch)``, with their 1-based epoch - 1 = our 0-based epoch),
    else the fractions ``milestones`` of training (the paper: x0.25 at 50/75/89/94%);
    cosine: half a cosine from 1 to 0 over training; constant: 1.
    """
    if cfg.name == "step":
        if cfg.milestone_epochs:
            return cfg.gamma ** bisect.bisect_right(cfg.milestone_epochs, epoch)
        passed = sum(epoch >= max(1, round(m * epochs)) for m in cfg.milestones)  # never epoch 0
        return cfg.gamma**passed
    if cfg.name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return 1.0


def learning_rate(cfg: ScheduleConfig, base_lr: float, epoch: int, epochs: int) -> float:
    """The learning rate of ``epoch`` (0-based) of ``epochs``, for ``base_lr`` = optim.lr.

    With ``warmup_epochs`` = W > 0 (cosine only) the AugLocal authors' ``adjust_learning_rate``
    term for term, on their 1-based epoch e = epoch + 1: cos(e) = base_lr / 2 (1 + cos(pi e /
    E)); e <= W: cos(e) (e - 1) / W + start (W + 1 - e) / W. Else ``base_lr * lr_factor``.
    """
    if cfg.name != "cosine" or cfg.warmup_epochs == 0:
        return base_lr * lr_factor(cfg, epoch, epochs)
    e, w = epoch + 1, cfg.warmup_epochs
    lr = 0.5 * base_lr * (1 + math.cos(math.pi * e / epochs))
    if e <= w:
        lr = lr * (e - 1) / w + cfg.warmup_start_lr * (w + 1 - e) / w
    return lr


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """A block's own optimiser over ``params``: SGD (momentum, Nesterov) or Adam, per optim.*."""
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
