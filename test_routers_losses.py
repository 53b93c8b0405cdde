"""Tests for routers.py and losses.py: hand-worked values, masking, shapes, gradients, bad configs.

Run: /work/venv/bin/python -m pytest -q test_routers_losses.py   (a few seconds on CPU)
"""

import math

import pytest
import torch
from torch.testing import assert_close

import losses
import routers
from losses import (classification_loss, dynamic_load_balancing_loss, lm_loss, load_balancing_loss,
                    quality_loss, router_z_loss, switch_aux_loss, total_loss)
from routers import Router, expert_capacity, switch_weights, top_k_weights, top_p_weights

LN3, LN4 = math.log(3.0), math.log(4.0)
# The 3-token, 2-expert case used by every router loss: softmax rows are exactly
#   t0 [0.75, 0.25]   t1 [0.25, 0.75]   t2 [0.8, 0.2]
Z3 = torch.tensor([[LN3, 0.0], [0.0, LN3], [LN4, 0.0]])
# Padding rows with garbage logits, masked out.
Z3_PADDED = torch.cat([Z3, torch.tensor([[50.0, -50.0], [-7.0, 30.0]])])
MASK_PADDED = torch.tensor([True, True, True, False, False])


def scalar(x):
    return torch.tensor(float(x))


# ----------------------------------------------------------------------------------------------------
# Router losses


def test_load_balancing_hand_worked_top1_and_top2():
    """Top-1 LB on 3 tokens x 2 experts equals E*sum f P by hand; top-2 of 2 experts gives exactly k=2."""
    # top-1 picks e0, e1, e0: f = [2/3, 1/3]; P = [(.75+.25+.8)/3, (.25+.75+.2)/3] = [.6, .4]
    expected = 2 * (2 / 3 * 0.6 + 1 / 3 * 0.4)                  # = 1.0666...
    assert_close(load_balancing_loss([Z3], None, top_k=1), scalar(expected))
    # top-2 with E = 2 selects both experts for every token: f = [1, 1], 2 * (.6 + .4) = 2
    assert_close(load_balancing_loss([Z3], None, top_k=2), scalar(2.0))


def test_load_balancing_uniform_gives_k():
    """Uniform routing gives k for top-k LB (so k*coef after the coefficient), for several E and k."""
    for e, k in [(4, 2), (8, 2), (8, 1), (6, 3)]:
        z = torch.zeros(10, e)
        val = load_balancing_loss([z, z, z], torch.ones(10, dtype=torch.bool), k)
        assert_close(val, scalar(k))
        assert_close(losses.ROUTER_AUX_LOSS_COEF * val, scalar(k * 0.001))


def test_router_losses_ignore_masked_padding():
    """Appending padding rows with garbage logits and masking them leaves every router loss unchanged."""
    for fn, kw in [(load_balancing_loss, {"top_k": 1}), (load_balancing_loss, {"top_k": 2}),
                   (dynamic_load_balancing_loss, {"top_p": 0.78}), (switch_aux_loss, {}),
                   (router_z_loss, {})]:
        assert_close(fn([Z3_PADDED, Z3_PADDED], MASK_PADDED, **kw), fn([Z3, Z3], None, **kw))


def test_load_balancing_concatenates_layers():
    """Layers are pooled (concatenated) as in the reference, not averaged loss by loss."""
    a = torch.tensor([[LN3, 0.0]] * 3)                          # every token -> e0, p = [.75, .25]
    b = torch.tensor([[0.0, LN3]] * 3)                          # every token -> e1, p = [.25, .75]
    # pooled: f = [.5, .5], P = [.5, .5] -> 2 * (.25 + .25) = 1.0 ; per-layer mean would be 2*.75 = 1.5
    assert_close(load_balancing_loss([a, b], None, top_k=1), scalar(1.0))
    assert_close(switch_aux_loss([a, b]), scalar(1.0))


def test_dynamic_load_balancing_hand_worked():
    """Top-p LB: top_p=.78 keeps {e0,e1},{e0,e1},{e0}; temperature divides probabilities before the cut."""
    # f = [3/3, 2/3]; P = [.6, .4] -> 2 * (1*.6 + 2/3*.4) = 1.7333...
    assert_close(dynamic_load_balancing_loss([Z3], None, top_p=0.78), scalar(2 * (0.6 + 2 / 3 * 0.4)))
    # top_p = .7: every token keeps only its largest expert -> same as top-1
    assert_close(dynamic_load_balancing_loss([Z3], None, top_p=0.7), scalar(2 * (2 / 3 * 0.6 + 1 / 3 * 0.4)))
    # temperature 2: q = p/2 sums to .5, never exceeds .78 -> all kept, f = [1, 1], P untempered: 2
    assert_close(dynamic_load_balancing_loss([Z3], None, top_p=0.78, temperature=2.0), scalar(2.0))
    # uniform over 4 experts with top_p .8 keeps all 4 -> the value is the mean experts per token, 4
    assert_close(dynamic_load_balancing_loss([torch.zeros(5, 4)], None, top_p=0.8), scalar(4.0))


def test_switch_aux_and_z_loss_hand_worked():
    """Switch aux = E*sum f P with argmax f; z-loss = mean logsumexp^2 = (2 ln^2 4 + ln^2 5)/3."""
    assert_close(switch_aux_loss([Z3]), scalar(2 * (2 / 3 * 0.6 + 1 / 3 * 0.4)))
    # logsumexp: [ln3, 0] -> ln(3+1) = ln4; [0, ln3] -> ln4; [ln4, 0] -> ln5
    expected = (2 * math.log(4.0) ** 2 + math.log(5.0) ** 2) / 3
    assert_close(router_z_loss([Z3]), scalar(expected))
    assert_close(switch_aux_loss([torch.zeros(6, 4)]), scalar(1.0))     # uniform -> 1


def test_router_losses_have_gradients_and_errors():
    """Router losses are differentiable in the logits; a bad top_k or mask length is a ValueError."""
    z = Z3.clone().requires_grad_(True)
    (load_balancing_loss([z], None, 1) + router_z_loss([z]) + dynamic_load_balancing_loss([z])).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="top_k"):
        load_balancing_loss([Z3], None, top_k=3)
    with pytest.raises(ValueError, match="token_mask"):
        load_balancing_loss([Z3], torch.ones(4, dtype=torch.bool), top_k=1)


# ----------------------------------------------------------------------------------------------------
# Routers: pure rules


def test_top_k_weights_rows_sum_to_one():
    """Top-k weights: (N, E), exactly k non-zeros per row at the k largest logits, rows sum to 1."""
    torch.manual_seed(0)
    z = torch.randn(7, 5)
    w = top_k_weights(z, 2)
    assert w.shape == (7, 5) and w.dtype == torch.float32
    assert ((w > 0).sum(-1) == 2).all()
    assert_close(w.sum(-1), torch.ones(7))
    assert (w.topk(2).indices.sort().values == z.topk(2).indices.sort().values).all()
    # by hand: p = [.75, .25] and top-1 -> [1, 0]
    assert_close(top_k_weights(Z3[:1], 1), torch.tensor([[1.0, 0.0]]))


def test_top_p_includes_crossing_expert():
    """Top-p keeps the smallest prefix whose cumsum exceeds top_p (crossing expert in), >= 1 expert, raw p."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.9, 0.03, 0.02], [0.25, 0.25, 0.25, 0.25]])
    z = p.log()
    w = top_p_weights(z, 0.8)
    # row 0: .5, .8 (not > .8), .95 > .8 -> 3 experts kept, the crossing one (0.15) included
    assert_close(w[0], torch.tensor([0.5, 0.3, 0.15, 0.0]))
    # row 1: .9 > .8 at once -> only the top expert, weight .9 (no renormalisation)
    assert_close(w[1], torch.tensor([0.0, 0.9, 0.0, 0.0]))
    # row 2: uniform -> .25 .5 .75 1.0 -> all four kept
    assert_close(w[2], p[2])
    # top_p = 1.0 keeps everything; a tiny top_p keeps exactly one
    assert ((top_p_weights(z, 1.0) > 0).sum(-1) == 4).all()
    assert ((top_p_weights(z, 1e-6) > 0).sum(-1) == 1).all()
    # temperature divides the probabilities (reference): T = 2 -> q = p/2, cumsum .25 .4 .475 .5 -> all kept
    assert_close(top_p_weights(z[:1], 0.8, temperature=2.0), p[:1] / 2)


def test_switch_capacity_drops_exactly_the_overflow():
    """Capacity: first come first served in token order; tokens past capacity get all-zero rows."""
    # 6 tokens, 2 experts; argmax: e0 e0 e1 e0 e0 e1 ; probabilities p_max = .75 or .8
    z = torch.tensor([[LN3, 0], [LN4, 0], [0, LN3], [LN3, 0], [LN4, 0], [0, LN4]])
    mask = torch.ones(6, dtype=torch.bool)
    assert expert_capacity(6, 2, 1.0) == 3 and expert_capacity(6, 2, 0.5) == 2
    assert expert_capacity(10, 1, 1.1) == 11                    # no float-error ceil to 12
    w = switch_weights(z, mask, capacity=2)
    expected = torch.tensor([[0.75, 0], [0.8, 0], [0, 0.75], [0, 0], [0, 0], [0, 0.8]])
    assert_close(w, expected)                                    # tokens 3, 4 overflow e0
    # per-sequence capacity (reference option): groups of 3 tokens, capacity 1 each
    w = switch_weights(z, mask, capacity=1, group_size=3)
    expected = torch.tensor([[0.75, 0], [0, 0], [0, 0.75], [0.75, 0], [0, 0], [0, 0.8]])
    assert_close(w, expected)


def test_switch_padding_consumes_no_capacity():
    """Padding tokens are not routed and do not take capacity from the real tokens after them."""
    z = torch.tensor([[LN3, 0], [LN3, 0], [LN4, 0], [LN3, 0]])  # all argmax e0
    mask = torch.tensor([False, True, False, True])
    w = switch_weights(z, mask, capacity=2)
    assert_close(w, torch.tensor([[0, 0], [0.75, 0], [0, 0], [0.75, 0]]))
    # the Router's default capacity counts only real tokens: ceil(1.0 * 2 / 2) = 1 -> token 3 overflows
    r = Router(2, 2, "mixlora-switch")
    with torch.no_grad():
        r.weight.copy_(torch.eye(2))                             # logits = x
    _, w = r(z, mask)
    assert_close(w, torch.tensor([[0, 0], [0.75, 0], [0, 0], [0, 0]]))


# ----------------------------------------------------------------------------------------------------
# Routers: the module


def test_router_shapes_dtypes_and_init():
    """Router returns fp32 (N, E) logits and weights for (N, D) or (B, T, D) input, bf16 included."""
    torch.manual_seed(0)
    r = Router(16, 8, "mixlora", top_k=2, init_range=0.02)
    assert r.weight.shape == (8, 16) and abs(r.weight.std().item() - 0.02) < 0.01
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    logits, w = r(x, torch.ones(2, 5, dtype=torch.bool))
    assert logits.shape == (10, 8) and w.shape == (10, 8)
    assert logits.dtype == torch.float32 and w.dtype == torch.float32
    assert_close(w.sum(-1), torch.ones(10))
    assert_close(logits, x.reshape(10, 16).float() @ r.weight.T)


def test_switch_router_works_at_eval():
    """Switch routing in eval mode routes tokens (not identity, not all zero) and equals training w/o jitter."""
    torch.manual_seed(0)
    r = Router(8, 4, "mixlora-switch", capacity_factor=2.0, init_range=1.0, jitter_noise=0.01).eval()
    x = torch.randn(12, 8)
    logits, w = r(x)
    assert w.abs().sum() > 0 and ((w > 0).sum(-1) <= 1).all()
    p = logits.softmax(-1)
    routed = w.sum(-1) > 0
    assert_close(w.sum(-1)[routed], p.max(-1).values[routed])    # routed tokens weighted by p_max
    r.jitter_noise = 0.0
    assert_close(r.train()(x)[1], w)


def test_jitter_only_in_training_and_out_of_place():
    """Jitter changes the logits in training only, and never modifies the caller's input tensor."""
    torch.manual_seed(0)
    r = Router(8, 4, "mixlora", jitter_noise=0.1, init_range=0.5)
    x = torch.randn(6, 8)
    x0 = x.clone()
    clean = x @ r.weight.T
    train_logits, _ = r.train()(x)
    assert_close(x, x0, rtol=0, atol=0)                          # input untouched
    assert not torch.allclose(train_logits, clean)
    eval_logits, _ = r.eval()(x)
    assert_close(eval_logits, clean)


def test_router_gradients_reach_weight():
    """Every strategy's weights carry gradient back to the router weight."""
    torch.manual_seed(0)
    for strategy in routers.STRATEGIES:
        r = Router(8, 4, strategy, top_k=2, init_range=0.5)
        _, w = r(torch.randn(6, 8))
        (w * torch.arange(4.0)).sum().backward()
        assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0, strategy


def test_single_expert_routes_everything_with_weight_one():
    """E = 1 (k = 1): every strategy gives every real token weight 1 on the only expert."""
    x = torch.randn(2, 3, 4)
    for strategy in routers.STRATEGIES:
        _, w = Router(4, 1, strategy, top_k=1)(x)
        assert_close(w, torch.ones(6, 1))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_experts=4, strategy="mixlora", top_k=5), "top_k"),
    (dict(num_experts=4, strategy="mixlora", top_k=0), "top_k"),
    (dict(num_experts=4, strategy="mixlora-dynamic", top_p=0.0), "top_p"),
    (dict(num_experts=4, strategy="mixlora-dynamic", top_p=1.5), "top_p"),
    (dict(num_experts=4, strategy="mixlora-switch", capacity_factor=0.0), "capacity_factor"),
    (dict(num_experts=4, strategy="mixlora-switch", expert_capacity=0), "expert_capacity"),
    (dict(num_experts=0, strategy="mixlora"), "num_experts"),
    (dict(num_experts=4, strategy="top3"), "routing_strategy"),
    (dict(num_experts=4, strategy="mixlora-dynamic", temperature=-1.0), "temperature"),
])
def test_bad_router_config_is_one_line_value_error(kwargs, match):
    """Each bad router setting raises a one-line ValueError naming the setting."""
    with pytest.raises(ValueError, match=match) as err:
        Router(8, **kwargs)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------
# Quality losses. Layer 1 gates on a 2 x 3 batch, mask [[1,1,0],[1,0,0]]:
#   g = sigmoid([[0, ln3, *], [-ln3, *, *]]) = [[.5, .75, *], [.25, *, *]]   (* = masked garbage)
# Layer 2: all logits 0 -> g = .5 everywhere.

QMASK = torch.tensor([[True, True, False], [True, False, False]])
S1 = torch.tensor([[0.0, LN3, 9.0], [-LN3, 7.0, -7.0]])
S2 = torch.zeros(2, 3)


def test_quality_sigmoid_and_mse_hand_worked():
    """sigmoid/mse token-wise and sample-wise values by hand, averaged over two layers."""
    tok = (0.5 + 0.75 + 0.25) / 3                                # .5
    smp = ((0.5 + 0.75) / 2 + 0.25) / 2                          # .4375
    assert_close(quality_loss([S1], QMASK, "sigmoid"), scalar(tok))
    assert_close(quality_loss([S1], QMASK, "sigmoid", sample_wise=True), scalar(smp))
    assert_close(quality_loss([S1, S2], QMASK, "sigmoid", sample_wise=True), scalar((smp + 0.5) / 2))
    tok2 = (0.25 + 0.5625 + 0.0625) / 3
    smp2 = ((0.25 + 0.5625) / 2 + 0.0625) / 2
    assert_close(quality_loss([S1, S2], QMASK, "mse"), scalar((tok2 + 0.25) / 2))
    assert_close(quality_loss([S1], QMASK, "mse", sample_wise=True), scalar(smp2))


def test_quality_bce_hand_worked():
    """bce: labels [1, 0] broadcast over tokens; -log g for y=1 and -log(1-g) for y=0."""
    y = torch.tensor([1.0, 0.0])
    a, b, c = -math.log(0.5), -math.log(0.75), -math.log(1 - 0.25)   # the 3 valid tokens
    assert_close(quality_loss([S1], QMASK, "bce", labels=y), scalar((a + b + c) / 3))
    assert_close(quality_loss([S1], QMASK, "bce", sample_wise=True, labels=y),
                 scalar(((a + b) / 2 + c) / 2))


def test_quality_moment_losses_hand_worked():
    """Moment losses: token-wise pools the valid tokens, sample-wise pools the per-sample mean gates."""
    # token pool [.5, .75, .25]: mu = .5, unbiased v = (0 + .0625 + .0625) / 2 = .0625
    assert_close(quality_loss([S1], QMASK, "beta_moment_matching"), scalar((0.0625 - 0.05) ** 2))
    assert_close(quality_loss([S1], QMASK, "mean_variance_regularization"), scalar(-0.1 * 0.0625))
    # sample pool [.625, .25]: mu = .4375, v = 2 * .1875^2 / 1 = .0703125
    mu, v = 0.4375, 0.0703125
    assert_close(quality_loss([S1], QMASK, "beta_moment_matching", sample_wise=True),
                 scalar((mu - 0.5) ** 2 + (v - 0.05) ** 2))
    assert_close(quality_loss([S1], QMASK, "mean_variance_regularization", sample_wise=True),
                 scalar((mu - 0.5) ** 2 - 0.1 * v))
    # custom weights and targets are used; layer 2 (all .5, v = 0) adds (0 - .05)^2 * w_var
    got = quality_loss([S1, S2], QMASK, "beta_moment_matching", beta_target_mean=0.4,
                       beta_target_var=0.1, w_mean=2.0, w_var=3.0)
    l1 = 2 * (0.5 - 0.4) ** 2 + 3 * (0.0625 - 0.1) ** 2
    l2 = 2 * (0.5 - 0.4) ** 2 + 3 * (0.0 - 0.1) ** 2
    assert_close(got, scalar((l1 + l2) / 2))


@pytest.mark.parametrize("kind", losses.QUALITY_LOSS_KINDS)
@pytest.mark.parametrize("sample_wise", [False, True])
def test_quality_loss_masked_padding_changes_nothing(kind, sample_wise):
    """Changing the gate logits at padded positions leaves every quality loss unchanged."""
    y = torch.tensor([1.0, 0.0])
    s_other = S1.clone()
    s_other[~QMASK] = torch.tensor([-30.0, 4.0, 11.0])
    a = quality_loss([S1, S2], QMASK, kind, sample_wise, labels=y)
    b = quality_loss([s_other, S2], QMASK, kind, sample_wise, labels=y)
    assert_close(a, b)


@pytest.mark.parametrize("kind", losses.QUALITY_LOSS_KINDS)
@pytest.mark.parametrize("sample_wise", [False, True])
def test_quality_loss_gradient_reaches_gate_weight(kind, sample_wise):
    """Every quality loss has a non-zero gradient w.r.t. a gate weight (the reference's .item() bug)."""
    torch.manual_seed(0)
    u = torch.randn(2, 3, 4, 8)                                  # (L, B, T, D) gate inputs
    w = torch.nn.Parameter(torch.randn(8) * 0.5)                 # one gate weight shared for the test
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    gates = [u[l] @ w for l in range(2)]                         # L x (B, T)
    loss = quality_loss(gates, mask, kind, sample_wise, labels=torch.tensor([1.0, 0.0, 1.0]))
    loss.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_quality_loss_errors_and_empty_mask():
    """Unknown kind or bce without labels is a ValueError; an all-padding batch gives 0, not NaN."""
    with pytest.raises(ValueError, match="quality_loss_type"):
        quality_loss([S1], QMASK, "entropy")
    with pytest.raises(ValueError, match="labels"):
        quality_loss([S1], QMASK, "bce")
    with pytest.raises(ValueError, match="labels"):
        quality_loss([S1], QMASK, "bce", labels=torch.ones(3))
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for kind in losses.QUALITY_LOSS_KINDS:
        for sw in (False, True):
            v = quality_loss([S1], empty, kind, sw, labels=torch.ones(2))
            assert torch.isfinite(v)
    assert_close(quality_loss([S1], empty, "sigmoid"), scalar(0.0))


# ----------------------------------------------------------------------------------------------------
# Task losses and the total


def test_lm_loss_matches_hand_computed_cross_entropy():
    """lm_loss sums -log softmax at the targets in fp32, skipping -100; mean divides by targets."""
    logits = torch.tensor([[0.0, LN3], [LN4, 0.0], [5.0, 5.0]])
    targets = torch.tensor([1, 1, -100])
    # p(target) = 3/4 and 1/5
    expected = -math.log(0.75) - math.log(0.2)
    assert_close(lm_loss(logits, targets), scalar(expected))
    assert_close(lm_loss(logits, targets, reduction="mean"), scalar(expected / 2))
    got = lm_loss(logits.bfloat16(), targets)                    # bf16 logits: computed in fp32
    assert got.dtype == torch.float32
    assert_close(got, scalar(expected), rtol=1e-2, atol=1e-2)


def test_classification_loss_single_and_multi_label():
    """Single-label is CE mean over the batch; multi-label is BCE-with-logits mean over B*C."""
    logits = torch.tensor([[0.0, LN3], [LN4, 0.0]])
    assert_close(classification_loss(logits, torch.tensor([1, 0])),
                 scalar((-math.log(0.75) - math.log(0.8)) / 2))
    # sigmoid(0) = .5, sigmoid(ln3) = .75, sigmoid(ln4) = .8
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    expected = (-math.log(0.5) - math.log(0.25) - math.log(0.8) - math.log(0.5)) / 4
    assert_close(classification_loss(logits, labels, multi_label=True), scalar(expected))
    with pytest.raises(ValueError, match="multi-label"):
        classification_loss(logits, torch.tensor([1, 0]), multi_label=True)


def test_total_loss_formula():
    """total = CE + aux_coef * (LB + w_q * L_q) + z_coef * Z, with missing terms as 0."""
    ce, lb, q, z = scalar(2.0), scalar(2.0), scalar(0.3), scalar(5.0)
    assert_close(total_loss(ce, lb, z, q), scalar(2.0 + 0.001 * (2.0 + 1.0 * 0.3) + 0.001 * 5.0))
    assert_close(total_loss(ce, lb, quality=q, router_aux_loss_coef=0.01, quality_loss_weight=0.5),
                 scalar(2.0 + 0.01 * (2.0 + 0.5 * 0.3)))
    assert_close(total_loss(ce), ce)


def test_losses_and_routers_share_the_top_p_rule():
    """losses' top-p selection matches routers.top_p_weights' non-zero pattern on random logits."""
    torch.manual_seed(0)
    z = torch.randn(50, 6) * 2
    for top_p, temp in [(0.5, 0.0), (0.9, 0.0), (0.6, 0.7)]:
        a = losses._top_p_selection(z.softmax(-1), top_p, temp) > 0
        b = top_p_weights(z, top_p, temp) > 0
        assert (a == b).all()


def test_oracle_hf_mixtral_load_balancing_and_switch_z_loss():
    """Optional oracle: top-k LB equals HF Mixtral's load_balancing_loss_func (masked and not), z-loss HF Switch's."""
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func
    torch.manual_seed(0)
    gates = tuple(torch.randn(10, 6) * 2 for _ in range(3))     # L x (N, E), N = 2 x 5
    am = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert_close(load_balancing_loss(gates, am.bool(), 2), load_balancing_loss_func(gates, 6, 2, am))
    assert_close(load_balancing_loss(gates, None, 2), load_balancing_loss_func(gates, 6, 2, None))
    assert_close(router_z_loss(gates), router_z_loss_func(torch.stack(gates)))
