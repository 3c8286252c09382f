"""The CUDA op audit: every registered rule and model against the lists of pipelocal.cuda_ops.

On the CPU, a TorchDispatchMode records every aten op of a training step (forward and backward)
and of an evaluation step; none may be one that deterministic mode refuses on CUDA. Then the
forward pass and the loss run again over fake CUDA tensors with CUDA autocast on, which
dispatches CUDA autocast's own kernels: a banned op raises there as on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.stateless import _reparametrize_module

from pipelocal.config import Config, ConfigError, ModelConfig, RuleConfig
from pipelocal.cuda_ops import (
    AUTOCAST_CUDA_BANNED,
    AUTOCAST_CUDA_FP32,
    DETERMINISM_RAISES,
    OpRecorder,
    blocking_copy,
    documented_raising_apis,
    fake_cuda_autocast,
)
from pipelocal.engine import Engine, LocalBlock, build_blocks
from pipelocal.models import MODELS, build_model
from pipelocal.rules import RULES
from tests.test_models import CASES

NUM_CLASSES = 10
_DEFAULT = ({"width": 0.0625, "fc_width": 32}, (3, 32, 32))
_SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 8, 8), "vgg8b": (1, 28, 28), "vgg11b": (1, 28, 28)}
_RULE_MODELS = ("cnn", "mlp", "resnet20")
"""Every rule runs on these: conv features of two kinds and fc features."""


def _cases() -> list:
    pairs = {(rule, model) for rule in RULES.names() for model in _RULE_MODELS}
    pairs |= {("predsim", model) for model in MODELS.names()}
    pairs |= {("glob", model) for model in MODELS.names()}
    return [pytest.param(r, m, id=f"{r}-{m}") for r, m in sorted(pairs)]


def _cfg(rule: str, model: str) -> tuple[Config, tuple[int, ...]]:
    overrides = CASES.get(model, _DEFAULT)[0]
    return Config(model=ModelConfig(name=model, **overrides), rule=RuleConfig(name=rule)), \
        _SHAPES.get(model, _DEFAULT[1])


def _blocks(rule: str, model: str) -> tuple[list[LocalBlock], tuple[int, ...]]:
    cfg, shape = _cfg(rule, model)
    try:
        specs = build_model(cfg.model, shape, NUM_CLASSES)
        return build_blocks(cfg, specs, NUM_CLASSES, range(len(specs)), "cpu"), shape
    except ConfigError as exc:
        pytest.skip(f"{rule} does not apply to {model}: {exc}")


def _batch(shape: tuple[int, ...], device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, *shape, generator=g)
    return x.to(device), torch.arange(4).to(device) % NUM_CLASSES


def test_the_raising_list_is_the_installed_torchs() -> None:
    """A torch whose documented list differs fails here until DETERMINISM_RAISES follows it."""
    assert sorted(DETERMINISM_RAISES) == documented_raising_apis()


def test_autocast_lists_name_ops_with_cuda_autocast_kernels() -> None:
    have = {n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
            if torch._C._dispatch_has_kernel_for_dispatch_key(n, "AutocastCUDA")}
    assert set(AUTOCAST_CUDA_FP32) | set(AUTOCAST_CUDA_BANNED) <= have


def test_the_recorder_sees_what_cuda_would_refuse() -> None:
    """The recorder is not blind: the ops it must catch, caught on the CPU."""
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with OpRecorder() as rec:
        F.adaptive_avg_pool2d(x, 3).sum().backward()
        F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=True).sum().backward()
        F.adaptive_avg_pool2d(x, 1).sum().backward()  # a mean: deterministic
        torch.bincount(torch.tensor([0, 1, 1]), weights=torch.ones(3))
        torch.bincount(torch.tensor([0, 1, 1]))  # without weights: deterministic
    assert rec.nondeterministic == [
        "torch.nn.AdaptiveAvgPool2d (_adaptive_avg_pool2d_backward.default)",
        "torch.nn.functional.interpolate (upsample_bilinear2d_backward.default)",
        "torch.bincount (bincount.default)",
    ]
    with OpRecorder() as rec:
        float(x.detach().sum())
    assert rec.syncs == ["_local_scalar_dense.default"]


def test_fake_cuda_autocast_refuses_binary_cross_entropy() -> None:
    with fake_cuda_autocast(torch.bfloat16):
        p = torch.rand(4, 3, device="cuda")
        assert torch.nn.Linear(3, 3, device="cuda")(p).dtype == torch.bfloat16
        assert torch.softmax(p.bfloat16(), 1).dtype == torch.float32  # fp32 list
        with pytest.raises(RuntimeError, match="unsafe to autocast"):
            F.binary_cross_entropy(p, p)


def test_blocking_copy_directions() -> None:
    cpu, meta = torch.zeros(2), torch.empty(2, device="meta")
    copy = torch.ops.aten.copy_.default
    to = torch.ops.aten._to_copy.default
    assert blocking_copy(copy, (meta, cpu), {}) == "host-to-device"
    assert blocking_copy(copy, (meta, cpu, True), {}) is None  # non_blocking
    assert blocking_copy(copy, (cpu, meta), {}) == "device-to-host"
    assert blocking_copy(copy, (cpu, cpu), {}) is None
    assert blocking_copy(to, (cpu,), {"device": torch.device("cuda")}) == "host-to-device"
    assert blocking_copy(to, (cpu,), {"device": "cuda", "non_blocking": True}) is None


@pytest.mark.parametrize(("rule", "model"), _cases())
def test_no_op_that_cuda_determinism_refuses(rule: str, model: str) -> None:
    blocks, shape = _blocks(rule, model)
    engine = Engine(blocks)
    x, y = _batch(shape)
    with OpRecorder() as rec:
        engine.train_batch(x, y, epoch=0)
        engine.eval_batch(x, y)
    assert rec.ops and rec.nondeterministic == []


@pytest.mark.parametrize(("rule", "model"), _cases())
@pytest.mark.parametrize("dtype", [torch.bfloat16, None], ids=["bf16", "fp32"])
def test_forward_and_loss_under_cuda_autocast(
    rule: str, model: str, dtype: torch.dtype | None
) -> None:
    """Each block's forward and local loss as on a GPU: no banned op, a float32 loss."""
    blocks, shape = _blocks(rule, model)
    with fake_cuda_autocast(dtype) as mode:
        x, y = _batch(shape, "cuda")
        image = x
        for block in blocks:
            state = {**dict(block.named_parameters()), **dict(block.named_buffers())}
            fake = {k: mode.from_tensor(v).to("cuda") for k, v in state.items()}
            with _reparametrize_module(block, fake), OpRecorder() as rec:
                block.train(True)
                block.generator = None  # a CPU generator cannot draw on (fake) CUDA tensors
                h = block(x.float())
                if block.classifier_reads_passed_on:
                    h = block.pass_on(h)
                loss, _ = block.local_loss(h, y, image)
                x = h.detach() if block.classifier_reads_passed_on else block.pass_on(h.detach())
            assert loss.dtype == torch.float32 and loss.device.type == "cuda", block.spec.name
            assert rec.nondeterministic == [] and rec.syncs == [], block.spec.name


def test_every_rule_is_audited() -> None:
    audited = {p.values[0] for p in _cases()}
    assert audited == set(RULES.names())
    assert {p.values[1] for p in _cases()} == set(MODELS.names())

