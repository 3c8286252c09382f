"""Models as ordered lists of blocks, by registered name (``pipelocal models`` lists them)."""

from pipelocal.config import ModelConfig
from pipelocal.models import (  # noqa: F401  (registers the models)
    mlp,
    mostafa,
    resnet,
    vgg,
    vgg_deep,
)
from pipelocal.models.base import MODELS, BlockSpec

__all__ = ["MODELS", "BlockSpec", "build_model"]


def build_model(
    cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int
) -> list[BlockSpec]:
    """Block specs for ``cfg`` on inputs of ``in_shape``; ``cfg.input_shape`` wins if set."""
    shape = tuple(cfg.input_shape) or tuple(in_shape)
    return MODELS.get(cfg.name)(cfg, shape, num_classes)
