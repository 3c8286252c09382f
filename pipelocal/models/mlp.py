"""MLP: ``depth`` hidden blocks of ``hidden`` units (Linear-BN-nonlin-dropout), then the output."""

from __future__ import annotations

from torch import nn

from pipelocal.config import ModelConfig
from pipelocal.models.base import BlockSpec, flat_size, nonlinearity, register_model

__all__ = ["build_mlp"]


def _hidden(d_in: int, d_out: int, cfg: ModelConfig, flatten: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    layers.append(nn.Linear(d_in, d_out, bias=not cfg.batchnorm))
    if cfg.batchnorm:
        layers.append(nn.BatchNorm1d(d_out))
    layers.append(nonlinearity(cfg.nonlin))
    return nn.Sequential(*layers)


def _output(d_in: int, num_classes: int, flatten: bool) -> nn.Module:
    linear = nn.Linear(d_in, num_classes)
    return nn.Sequential(nn.Flatten(), linear) if flatten else linear


@register_model("mlp")
def build_mlp(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> list[BlockSpec]:
    specs: list[BlockSpec] = []
    shape = tuple(in_shape)
    for i in range(cfg.depth):
        d_in, flatten = flat_size(shape), len(shape) > 1
        specs.append(
            BlockSpec(
                name=f"fc{i + 1}",
                kind="fc",
                make=lambda d_in=d_in, flatten=flatten: _hidden(d_in, cfg.hidden, cfg, flatten),
                in_shape=shape,
                out_shape=(cfg.hidden,),
                dropout=cfg.dropout,
            )
        )
        shape = (cfg.hidden,)
    d_in, flatten = flat_size(shape), len(shape) > 1
    specs.append(
        BlockSpec(
            name="out",
            kind="output",
            make=lambda: _output(d_in, num_classes, flatten),
            in_shape=shape,
            out_shape=(num_classes,),
        )
    )
    return specs
