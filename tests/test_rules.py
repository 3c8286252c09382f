"""Tests for pipelocal.rules: similarity matrices, pooling, feedback alignment and every rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipelocal.config import ModelConfig, OptimConfig, RuleConfig, ScheduleConfig
from pipelocal.engine import Engine, LocalBlock
from pipelocal.models import BlockSpec, build_model
from pipelocal.rules import RULES, build_rule
from pipelocal.rules.base import Pooling
from pipelocal.rules.fixed import draw_fixed, square_hinge
from pipelocal.rules.functional import (
    Conv2dFA,
    LinearFA,
    label_onehot,
    pool_window,
    pooled_size,
    similarity_matrix,
)

NUM_CLASSES = 10
FIXED_RULES = ("sym", "scfb", "tlc")



# --------------------------------------------------------------------------- similarity


def test_similarity_matrix_hand_example() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 0.0, 2.0]])
    # Centred: [-1, 0, 1], [1, 0, -1], [0, -1, 1]; each has norm sqrt(2), so the cosines are
    # dot products / 2: a.b = -2/2, a.c = 1/2, b.c = -1/2.
    expected = torch.tensor([[1.0, -1.0, 0.5], [-1.0, 1.0, -0.5], [0.5, -0.5, 1.0]])
    torch.testing.assert_close(similarity_matrix(x), expected, atol=1e-6, rtol=0)


def test_similarity_matrix_two_features() -> None:
    # Centring two features leaves +-(a - b)/2: the cosine is the sign agreement.
    x = torch.tensor([[5.0, 1.0], [0.0, 2.0], [7.0, 3.0], [1.0, 4.0]])
    s = torch.tensor([1.0, -1.0, 1.0, -1.0])
    torch.testing.assert_close(similarity_matrix(x), s[:, None] * s[None, :], atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(6, 5), (6, 2, 3, 3), (5, 7, 4, 4), (4, 8, 1, 1)])
def test_similarity_matrix_unit_diagonal_symmetric_bounded(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    s = similarity_matrix(x)
    assert s.shape == (shape[0], shape[0])
    torch.testing.assert_close(s.diagonal(), torch.ones(shape[0]), atol=1e-6, rtol=0)
    assert torch.equal(s, s.t()) or torch.allclose(s, s.t(), atol=1e-7)
    assert s.abs().max() <= 1.0


def test_similarity_matrix_conv_uses_per_channel_std_over_space() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 3, 2, generator=g)  # C = 5 > 3, H*W = 6 > 1
    # Per-channel std over the 6 positions, by hand (unbiased, as torch.std).
    mean = x.sum(dim=(2, 3), keepdim=True) / 6
    std = ((x - mean) ** 2).sum(dim=(2, 3)).div(5).sqrt()  # [4, 5]
    c = std - std.mean(dim=1, keepdim=True)
    n = c / c.norm(dim=1, keepdim=True)
    torch.testing.assert_close(similarity_matrix(x), n @ n.t(), atol=1e-6, rtol=0)
    # ... which is not what the flattened features give.
    assert not torch.allclose(similarity_matrix(x), similarity_matrix(x.flatten(1)), atol=1e-3)


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (4, 6, 1, 1)])
def test_similarity_matrix_conv_few_channels_or_1x1_flattens(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(similarity_matrix(x), similarity_matrix(x.flatten(1)))


@pytest.mark.parametrize("k", [2, 3, 10])
def test_label_similarity_target(k: int) -> None:
    y = torch.tensor([0, 1, 1, k - 1, 0, k // 2])
    target = similarity_matrix(label_onehot(y, k))
    # One-hot e_i centred is e_i - 1/K with squared norm (K-1)/K; two different classes have
    # centred dot product -1/K, so their cosine is -1/(K-1). Equal labels: 1.
    same = y[:, None] == y[None, :]
    expected = torch.where(same, torch.tensor(1.0), torch.tensor(-1.0 / (k - 1)))
    torch.testing.assert_close(target, expected, atol=1e-6, rtol=0)


def test_label_onehot() -> None:
    out = label_onehot(torch.tensor([2, 0]), 3)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))


# --------------------------------------------------------------------------- pooling


@pytest.mark.parametrize(
    ("shape", "dim", "expected"),
    [
        ((128, 32, 32), 2048, (128, 4, 4)),  # VGG8B conv1 on CIFAR: halve h, w three times
        ((256, 16, 16), 2048, (256, 2, 4)),  # H is halved first, so H <= W
        ((64, 8, 8), 2048, (64, 4, 8)),
        ((1, 28, 28), 50, (1, 7, 7)),
        ((3, 7, 5), 10, (3, 1, 2)),  # odd sizes round up
        ((8, 4, 4), 2048, (8, 4, 4)),  # already small enough: unchanged
        ((16,), 8, (16,)),  # fc features are never pooled
    ],
)
def test_pooled_size_hand_examples(
    shape: tuple[int, ...], dim: int, expected: tuple[int, ...]
) -> None:
    assert pooled_size(shape, dim) == expected


@pytest.mark.parametrize(
    ("shape", "dim"),
    [
        ((128, 32, 32), 2048),
        ((256, 16, 16), 2048),
        ((3, 7, 5), 10),
        ((512, 4, 4), 512),
        ((32, 9, 13), 100),
        ((2, 1, 40), 8),
    ],
)
def test_pooled_size_reaches_dim_and_pooling_outputs_that_many(
    shape: tuple[int, ...], dim: int
) -> None:
    c, h, w = pooled_size(shape, dim)
    assert c == shape[0] and 1 <= h <= shape[1] and 1 <= w <= shape[2]
    assert c * h * w <= dim
    pool = Pooling(shape, dim)
    out = pool(torch.randn(3, *shape))
    assert out.shape == (3, c * h * w) and pool.out_features == c * h * w


def test_pooled_size_stops_at_1x1_when_channels_exceed_dim() -> None:
    assert pooled_size((4096, 2, 2), 2048) == (4096, 1, 1)


def test_pooling_averages() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = Pooling((1, 4, 4), 4)(x)  # -> 1x2x2, mean of each 2x2 quadrant
    assert torch.equal(out, torch.tensor([[2.5, 4.5, 10.5, 12.5]]))


# --------------------------------------------------------------------------- feedback alignment


def test_linear_fa_forward_equals_linear_and_backward_substitutes_feedback() -> None:
    torch.manual_seed(0)
    fa = LinearFA(6, 4)
    assert fa.feedback.shape == fa.weight.shape == (4, 6)
    assert not torch.equal(fa.feedback, fa.weight)
    x = torch.randn(5, 6, requires_grad=True)
    out = fa(x)
    assert torch.equal(out, F.linear(x, fa.weight, fa.bias))
    grad_out = torch.randn(5, 4)
    out.backward(grad_out)

    # The true gradients, by autograd through F.linear on copies of the same tensors.
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = fa.weight.detach().clone().requires_grad_(True)
    b_ref = fa.bias.detach().clone().requires_grad_(True)
    F.linear(x_ref, w_ref, b_ref).backward(grad_out)

    assert torch.equal(x.grad, grad_out @ fa.feedback)  # the error travels through B
    torch.testing.assert_close(x_ref.grad, grad_out @ fa.weight)  # not through W
    assert not torch.allclose(x.grad, x_ref.grad)
    torch.testing.assert_close(fa.weight.grad, w_ref.grad)  # the weights learn as usual
    torch.testing.assert_close(fa.bias.grad, b_ref.grad)
    assert fa.feedback.grad is None and not fa.feedback.requires_grad


def test_linear_fa_feedback_is_a_buffer() -> None:
    fa = LinearFA(3, 2)
    assert "feedback" in dict(fa.named_buffers())
    assert "feedback" not in dict(fa.named_parameters())
    assert "feedback" in fa.state_dict()


@pytest.mark.parametrize(("shape", "dim"), [((16,), 2048), ((4, 2, 2), 2048), ((8, 4, 4), 32)])
def test_pred_bpf_gradient_reaching_the_block_uses_feedback(
    shape: tuple[int, ...], dim: int
) -> None:
    torch.manual_seed(0)
    cfg = RuleConfig(name="pred-bpf", target_proj_size=12, dim_in_decoder=dim)
    rule = build_rule(shape, 5, cfg)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(8, *shape, generator=g).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    loss, _ = rule.loss(h, y)
    loss.backward()

    # dL/dz by autograd on the decoder output, held as a leaf.
    pooled = rule.pool(h.detach())
    z = F.linear(pooled, rule.decoder.weight, rule.decoder.bias).detach().requires_grad_(True)
    target = (label_onehot(y, 5) @ rule.label_proj.t() > 0).float()  # binarised projection
    (dz,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(z, target), z)
    # Through the pooling (a linear map) to h: what arrives is dz @ B, not dz @ W.
    h_ref = h.detach().clone().requires_grad_(True)
    rule.pool(h_ref).backward(dz @ rule.decoder.feedback)
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-7, rtol=1e-6)
    h_true = h.detach().clone().requires_grad_(True)
    rule.pool(h_true).backward(dz @ rule.decoder.weight.detach())
    assert not torch.allclose(h.grad, h_true.grad, atol=1e-4)


def test_pred_bpf_class_scores_pick_the_class_whose_code_matches() -> None:
    torch.manual_seed(0)
    rule = build_rule((16,), 4, RuleConfig(name="pred-bpf", target_proj_size=64))
    codes = (rule.label_proj.t() > 0).float()  # [classes, proj]
    assert len({tuple(c.tolist()) for c in codes}) == 4  # distinct codes
    z = 5.0 * (2 * codes - 1)  # logits agreeing with class c's code, one row per class
    scores = rule._class_scores(z)
    assert scores.shape == (4, 4)
    assert torch.equal(scores.argmax(1), torch.arange(4))


def _fc_spec() -> BlockSpec:
    return build_model(ModelConfig(name="mlp", hidden=16, depth=2), (1, 8, 8), NUM_CLASSES)[0]


def _conv_spec() -> BlockSpec:
    specs = build_model(ModelConfig(name="cnn", width=0.25, fc_width=16), (1, 8, 8), NUM_CLASSES)
    return specs[0]


def _block(spec: BlockSpec, rule: str, index: int = 0, **rule_kw: float) -> LocalBlock:
    return LocalBlock(
        index,
        spec,
        num_classes=NUM_CLASSES,
        rule=RuleConfig(name=rule, **rule_kw),
        optim=OptimConfig(lr=1e-2),
        schedule=ScheduleConfig(),
        epochs=2,
        seed=0,
    )


def _batch(shape: tuple[int, ...], n: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


@pytest.mark.parametrize("rule", ["pred-bpf", "sim-bpf", "predsim-bpf"])
def test_fixed_random_matrices_do_not_change_with_training(rule: str) -> None:
    block = _block(_conv_spec(), rule, target_proj_size=16)
    fixed = {
        k: v.clone()
        for k, v in block.rule.named_buffers()
        if k.endswith(("feedback", "label_proj"))
    }
    assert "label_proj" in fixed
    assert ("decoder.feedback" in fixed) == (rule != "sim-bpf")
    in_optimizer = {id(p) for g in block.optimizer.param_groups for p in g["params"]}
    before = {k: v.clone() for k, v in block.named_parameters()}
    x, y = _batch(block.spec.in_shape)
    for _ in range(3):
        block.train_step(x, y)
    buffers = dict(block.rule.named_buffers())
    for k, v in fixed.items():
        assert torch.equal(buffers[k], v), k
        assert id(buffers[k]) not in in_optimizer
    assert any(not torch.equal(p, before[k]) for k, p in block.named_parameters())


# --------------------------------------------------------------------------- composition


def test_predsim_is_the_beta_weighted_sum_of_pred_and_sim() -> None:
    shape, beta = (8, 4, 4), 0.7
    torch.manual_seed(0)
    both = build_rule(shape, NUM_CLASSES, RuleConfig(name="predsim", beta=beta))
    pred = build_rule(shape, NUM_CLASSES, RuleConfig(name="pred"))
    sim = build_rule(shape, NUM_CLASSES, RuleConfig(name="sim"))
    pred.load_state_dict({k: v for k, v in both.state_dict().items() if k in pred.state_dict()})
    sim.load_state_dict({k: v for k, v in both.state_dict().items() if k in sim.state_dict()})
    h, y = _batch(shape)
    total, scores = both.loss(h, y)
    loss_pred, scores_pred = pred.loss(h, y)
    loss_sim, scores_sim = sim.loss(h, y)
    torch.testing.assert_close(total, (1 - beta) * loss_pred + beta * loss_sim)
    assert scores_sim is None and torch.equal(scores, scores_pred)
    assert scores.shape == (16, NUM_CLASSES) and not scores.requires_grad
    # sim alone: the MSE between the head's and the labels' similarity matrices.
    expected = F.mse_loss(
        similarity_matrix(sim.sim_head(h)), similarity_matrix(label_onehot(y, NUM_CLASSES))
    )
    torch.testing.assert_close(loss_sim, expected)


# Rules with auxiliary nets built from the model around the block (conv features, a context):
# tested in test_auglocal.py, test_dgl_infopro.py and the recipe / transparency tests.
_AUX_NET_RULES = {"auglocal", "dgl", "infopro"}


def test_logits_only_for_rules_with_a_classifier() -> None:
    h, _ = _batch((16,))
    for name in sorted(set(RULES.names()) - _AUX_NET_RULES):
        rule = build_rule((16,), NUM_CLASSES, RuleConfig(name=name))
        scores = rule.logits(h)
        has_pred = name.startswith("pred") or name in FIXED_RULES
        assert (scores is not None) == has_pred, name
        if has_pred:
            assert scores.shape == (16, NUM_CLASSES)


def test_only_the_glob_rules_are_global() -> None:
    assert {n for n in RULES.names() if RULES.get(n).is_global} == {"glob", "glob+sim", "fa"}
    glob = build_rule((16,), NUM_CLASSES, RuleConfig(name="glob"))
    loss, scores = glob.loss(*_batch((16,)))
    assert float(loss) == 0.0 and scores is None and not list(glob.parameters())


def test_unknown_rule_lists_the_available_ones() -> None:
    with pytest.raises(KeyError) as err:
        RULES.get("nope")
    assert "'nope'" in str(err.value)
    assert all(name in str(err.value) for name in RULES.names())


# --------------------------------------------------------------------------- every rule


@pytest.mark.parametrize("kind", ["fc", "conv"])
@pytest.mark.parametrize("rule", sorted(set(RULES.names()) - _AUX_NET_RULES))
def test_every_rule_trains_a_block(rule: str, kind: str) -> None:
    """A local rule trains its block alone; a global one through the engine (it has no own loss)."""
    if RULES.get(rule).is_global:
        mc = (
            ModelConfig(name="mlp", hidden=16, depth=2)
            if kind == "fc"
            else ModelConfig(name="cnn", width=0.25, fc_width=16)
        )
        specs = build_model(mc, (1, 8, 8), NUM_CLASSES)
        engine = Engine([_block(spec, rule, i) for i, spec in enumerate(specs)])
        block, step = engine.blocks[0], engine.train_batch
    else:
        block = _block(_fc_spec() if kind == "fc" else _conv_spec(), rule)
        step = None
    assert block.spec.kind == kind
    before = {k: v.detach().clone() for k, v in block.named_parameters()}
    x, y = _batch(block.spec.in_shape)
    # Two steps: a zero-initialised local classifier (the authors' init) sends no error back on
    # the first one, so the body only moves from the second step on.
    for _ in range(2):
        out = step(x, y, 0) if step else block.train_step(x, y)
    assert not out.requires_grad
    stats = block.pop_stats()
    assert math.isfinite(stats["loss"])
    if not RULES.get(rule).is_global or rule == "glob+sim":
        assert stats["loss"] > 0
    for k, p in block.named_parameters():
        assert torch.isfinite(p).all(), k
        assert not torch.equal(p, before[k]), f"{rule}: {k} did not change"


# --------------------------------------------------------------------------- the authors' choices


def test_pooling_is_the_authors_padded_avg_pool_by_hand() -> None:
    """7x7 map, dim 2*4*4: window 2, stride 2, pad 1, zero padding counted in every mean."""
    assert pool_window((2, 7, 7), 32) == ((2, 2), (1, 1))
    x = torch.arange(98.0).view(1, 2, 7, 7)
    pool = Pooling((2, 7, 7), 32)
    out = pool.map(x)
    assert out.shape == (1, 2, 4, 4) and pool.out_features == 32
    # Padded map rows/cols -1..7; window (i, j) covers rows 2i-1, 2i and cols 2j-1, 2j.
    padded = F.pad(x, (1, 1, 1, 1))
    for c in range(2):
        for i in range(4):
            for j in range(4):
                window = padded[0, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
                assert out[0, c, i, j] == window.sum() / 4  # /4 even where it holds padding
    assert out[0, 0, 0, 0] == x[0, 0, 0, 0] / 4  # corner: one real value, three zeros
    # Adaptive pooling has the same output size but other values.
    assert not torch.allclose(out, F.adaptive_avg_pool2d(x, (4, 4)))


@pytest.mark.parametrize(
    ("shape", "dim", "window"),
    [((128, 32, 32), 2048, ((8, 8), (0, 0))), ((256, 16, 16), 2048, ((8, 4), (0, 0))),
     ((3, 7, 5), 10, ((8, 4), (4, 2))), ((8, 4, 4), 4096, ((1, 1), (0, 0)))],
)
def test_pool_window_doubles_height_then_width(shape, dim, window) -> None:
    assert pool_window(shape, dim) == window


def test_similarity_std_needs_height_above_one_as_the_authors() -> None:
    x = torch.randn(4, 5, 1, 6, generator=torch.Generator().manual_seed(3))  # H = 1, W = 6
    torch.testing.assert_close(similarity_matrix(x), similarity_matrix(x.flatten(1)))
    y = x.transpose(2, 3)  # H = 6, W = 1: per-channel std
    std = y.flatten(2).std(dim=2)
    torch.testing.assert_close(similarity_matrix(y), similarity_matrix(std))


def test_no_similarity_std_switch_flattens() -> None:
    x = torch.randn(4, 5, 3, 3, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(similarity_matrix(x, use_std=False), similarity_matrix(x.flatten(1)))
    assert not torch.allclose(similarity_matrix(x), similarity_matrix(x, use_std=False))
    rule = build_rule((5, 3, 3), NUM_CLASSES, RuleConfig(name="sim", similarity_std=False))
    h, y = torch.randn(4, 5, 3, 3), torch.tensor([0, 1, 0, 2])
    loss, _ = rule.loss(h, y)
    target = similarity_matrix(label_onehot(y, NUM_CLASSES))
    torch.testing.assert_close(loss, F.mse_loss(similarity_matrix(rule.sim_head(h).flatten(1)),
                                                target))


def test_sim_bpf_on_conv_keeps_the_pooled_map_and_its_channel_spread() -> None:
    shape = (8, 8, 8)
    torch.manual_seed(0)
    rule = build_rule(shape, NUM_CLASSES, RuleConfig(name="sim-bpf", dim_in_decoder=128))
    h = torch.randn(6, *shape, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    pooled = F.avg_pool2d(h, 2)  # 8*8*8 -> 8*4*4 = 128
    ry = similarity_matrix(label_onehot(y, NUM_CLASSES) @ rule.label_proj.t())
    expected = F.mse_loss(similarity_matrix(pooled.flatten(2).std(dim=2)), ry)
    loss, _ = rule.loss(h, y)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("rule", ["pred", "predsim", "pred-bpf", "predsim-bpf"])
def test_local_classifier_weight_starts_at_zero(rule: str) -> None:
    dec = build_rule((8, 4, 4), NUM_CLASSES, RuleConfig(name=rule)).decoder
    assert torch.count_nonzero(dec.weight) == 0
    if rule.endswith("bpf"):
        assert torch.count_nonzero(dec.bias) == 0  # the authors' LinearFA zeroes its bias
        assert torch.count_nonzero(dec.feedback) > 0
    else:
        assert torch.count_nonzero(dec.bias) > 0
    dec = build_rule((8, 4, 4), NUM_CLASSES, RuleConfig(name=rule, zero_init=False)).decoder
    assert torch.count_nonzero(dec.weight) > 0


def test_decoder_input_default_is_the_authors_4096() -> None:
    assert RuleConfig().dim_in_decoder == 4096
    assert build_rule((128, 32, 32), NUM_CLASSES, RuleConfig(name="pred")).pool.out_features \
        == 128 * 4 * 8


# --------------------------------------------------------------------------- Mostafa et al.


def _fixed(rule: str, shape: tuple[int, ...] = (6,), **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_rule(shape, 4, RuleConfig(name=rule, **kw))


@pytest.mark.parametrize("loss", ["ce", "hinge"])
def test_sym_gives_the_exact_gradient_of_the_local_loss(loss: str) -> None:
    rule = _fixed("sym", (3, 2, 2), classifier_loss=loss)
    h = torch.randn(5, 3, 2, 2, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 1])
    out, scores = rule.loss(h, y)
    out.backward()
    # Autograd through a plain linear classifier holding the same M.
    h_ref = h.detach().clone().requires_grad_(True)
    s = h_ref.flatten(1) @ rule.classifier.t()
    ref = F.cross_entropy(s, y) if loss == "ce" else square_hinge(s, y)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(h.grad, h_ref.grad)
    assert torch.equal(scores, s.detach())
    assert not rule.classifier.requires_grad and not list(rule.parameters())


def test_square_hinge_by_hand() -> None:
    s = torch.tensor([[2.0, 0.5, -1.0], [0.0, -3.0, 0.2]])
    y = torch.tensor([0, 2])
    # Row 0: t = [1, -1, -1]: max(0, 1 - 2)^2 + (1 + 0.5)^2 + (1 - 1)^2 = 2.25.
    # Row 1: t = [-1, -1, 1]: 1^2 + 0 + 0.8^2 = 1.64.
    torch.testing.assert_close(square_hinge(s, y), torch.tensor((2.25 + 1.64) / 2))


def test_scfb_feedback_is_sign_concordant_with_independent_magnitudes() -> None:
    rule = _fixed("scfb", (40,))
    m, kt = rule.classifier, rule.feedback_t
    assert torch.equal(kt.sign(), m.sign())
    assert not torch.allclose(kt.abs(), m.abs())
    h = torch.randn(5, 40, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 1])
    loss, _ = rule.loss(h, y)
    loss.backward()
    s = (h.detach() @ m.t()).requires_grad_(True)
    (ds,) = torch.autograd.grad(F.cross_entropy(s, y), s)
    torch.testing.assert_close(h.grad, ds @ kt)  # e_y = K e_s, K = feedback_t^T
    assert not torch.allclose(h.grad, ds @ m)


def test_fixed_classifier_init_has_the_papers_std() -> None:
    n, c = 3000, 10
    std = math.sqrt(2 / (n + c))
    for init in ("uniform", "gaussian"):
        m, r = draw_fixed(7, c, n, init)
        assert abs(float(m.std()) / std - 1) < 0.03 and abs(float(m.mean())) < 0.1 * std
        assert not torch.equal(m, r)
    m, _ = draw_fixed(7, c, n, "uniform")
    assert float(m.abs().max()) <= std * math.sqrt(3)


def test_fixed_matrices_are_regenerated_from_the_stored_seed_not_stored() -> None:
    rule = _fixed("scfb", (3, 2, 2))
    state = rule.state_dict()
    assert set(state) == {"_extra_state"} and state["_extra_state"] == {"seed": rule.seed}
    torch.manual_seed(123)  # another seed: other matrices ...
    other = build_rule((3, 2, 2), 4, RuleConfig(name="scfb"))
    assert not torch.equal(other.classifier, rule.classifier)
    other.load_state_dict(state)  # ... until the stored seed regenerates them
    assert torch.equal(other.classifier, rule.classifier)
    assert torch.equal(other.feedback_t, rule.feedback_t)
    m, r = draw_fixed(rule.seed, 4, 12, "uniform")
    assert torch.equal(rule.classifier, m) and torch.equal(rule.feedback_t, r.abs() * m.sign())


def test_tlc_trains_its_classifier() -> None:
    spec = _fc_spec()
    block = _block(spec, "tlc")
    m0 = block.rule.classifier.detach().clone()
    assert block.rule.classifier.requires_grad
    assert "rule.classifier" in block.state_dict()  # a trained M is state, unlike sym's
    x, y = _batch(spec.in_shape)
    block.train_step(x, y)
    assert not torch.equal(block.rule.classifier, m0)
    sym = _block(spec, "sym")
    sym_m = sym.rule.classifier.clone()
    sym.train_step(x, y)
    assert torch.equal(sym.rule.classifier, sym_m) and "rule.classifier" not in sym.state_dict()


def test_fixed_classifier_reads_the_dropped_and_pooled_output() -> None:
    specs = build_model(ModelConfig(name="cnn", width=0.25, fc_width=16, dropout=0.5),
                        (1, 8, 8), NUM_CLASSES)
    block = _block(specs[0], "sym")
    assert block.rule.features == math.prod(specs[0].wire_shape)  # 8 maps of 4x4, post-pool
    x, y = _batch(specs[0].in_shape)
    out = block.train_step(x, y)
    assert out.shape[1:] == specs[0].wire_shape
    stats = block.pop_stats()
    assert stats["acc"] is not None
    out_eval, scores = block.eval_step(x)
    assert scores.shape == (16, NUM_CLASSES)
    torch.testing.assert_close(scores, block.rule.logits(out_eval))


# --------------------------------------------------------------------------- feedback alignment


def test_conv_fa_forward_equals_conv_and_backward_substitutes_feedback() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    fa = Conv2dFA(conv)
    x = torch.randn(2, 3, 7, 7, requires_grad=True)
    out = fa(x)
    assert torch.equal(out, conv(x))
    g = torch.randn_like(out)
    out.backward(g)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = conv.weight.detach().clone().requires_grad_(True)
    F.conv2d(x_ref, w_ref, conv.bias.detach(), 2, 1).backward(g)
    torch.testing.assert_close(conv.weight.grad, w_ref.grad)  # weights learn as usual
    x_fb = x.detach().clone().requires_grad_(True)
    F.conv2d(x_fb, fa.feedback, None, 2, 1).backward(g)
    torch.testing.assert_close(x.grad, x_fb.grad)  # the error goes down through B
    assert not torch.allclose(x.grad, x_ref.grad)


def test_fa_differs_from_backprop_only_through_its_feedback_matrices() -> None:
    """With every B set to its layer's W, an fa step is a glob step (up to float rounding)."""
    mc = ModelConfig(name="cnn", width=0.25, fc_width=16, dropout=0.2)
    specs = build_model(mc, (1, 8, 8), NUM_CLASSES)
    fa = Engine([_block(s, "fa", i) for i, s in enumerate(specs)])
    glob = Engine([_block(s, "glob", i) for i, s in enumerate(specs)])
    feedbacks = [m for b in fa.blocks for m in b.modules() if isinstance(m, (LinearFA, Conv2dFA))]
    assert len(feedbacks) == 4  # conv1, conv2, fc1, out
    x, y = _batch((1, 8, 8))
    fa_state = {k: v.clone() for k, v in fa.blocks[0].state_dict().items()}
    glob_params = [dict(b.named_parameters()) for b in glob.blocks]
    for block, ref in zip(fa.blocks, glob_params):  # same init apart from B
        for k, p in block.named_parameters():
            assert torch.equal(p, ref[k]), k
    for m in feedbacks:
        m.feedback.copy_(m.weight.detach())
    fa.train_batch(x, y, 0)
    glob.train_batch(x, y, 0)
    for block, ref in zip(fa.blocks, glob.blocks):
        for (k, p), (_, q) in zip(block.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=k)
    # With random B (as built), the hidden layers get other updates.
    fa2 = Engine([_block(s, "fa", i) for i, s in enumerate(specs)])
    fa2.train_batch(x, y, 0)
    w_fa = fa2.blocks[0].body[0].weight
    assert not torch.allclose(w_fa, glob.blocks[0].body[0].weight, atol=1e-6)
    assert fa_state.keys() == fa2.blocks[0].state_dict().keys()


@pytest.mark.parametrize("rule", ["pred", "predsim", "pred-bpf", "predsim-bpf", *FIXED_RULES])
def test_every_classifier_rule_reports_each_blocks_test_accuracy(rule: str) -> None:
    """The papers' per-layer tables: every hidden block's local classifier is evaluated."""
    specs = build_model(ModelConfig(name="cnn", width=0.25, fc_width=16), (1, 8, 8), NUM_CLASSES)
    engine = Engine([_block(s, rule, i) for i, s in enumerate(specs)])
    x, y = _batch((1, 8, 8))
    engine.train_batch(x, y, 0)
    engine.eval_batch(x, y)
    stats = engine.pop_eval_stats()
    assert sorted(stats) == list(range(len(specs)))  # conv1, conv2, fc1 and the output
    assert all(s["count"] == 16 and 0 <= s["correct"] <= 16 for s in stats.values())
