"""TDMPC2WorldModel and its building blocks."""
import math

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict

from torchrl_dreammpc.modules import (
    MODEL_SIZES,
    EnsembleMLP,
    SimNorm,
    SymlogTwoHot,
    TDMPC2WorldModel,
    discount_from_episode_length,
)

TINY = dict(enc_dim=32, mlp_dim=32, latent_dim=16)


def tiny_model(obs_dim=5, action_dim=2, **kw):
    torch.manual_seed(0)
    return TDMPC2WorldModel(obs_dim, action_dim, model_size=1, **{**TINY, **kw})


def test_simnorm_groups_sum_to_one():
    x = torch.randn(4, 3, 64) * 5
    y = SimNorm(8)(x)
    groups = y.view(4, 3, 8, 8)
    assert torch.allclose(groups.sum(-1), torch.ones(4, 3, 8), atol=1e-6)
    assert (y >= 0).all()
    with pytest.raises(ValueError, match="multiple of 8"):
        SimNorm(8)(torch.randn(2, 12))


def test_latents_are_simnormed():
    wm = tiny_model()
    z = wm.encode(torch.randn(7, 5))
    assert torch.allclose(z.view(7, -1, 8).sum(-1), torch.ones(7, 2), atol=1e-5)
    z2 = wm.next(z, torch.rand(7, 2) * 2 - 1)
    assert torch.allclose(z2.view(7, -1, 8).sum(-1), torch.ones(7, 2), atol=1e-5)


def _tdmpc2_two_hot(x, vmin=-10.0, vmax=10.0, num_bins=101):
    """TD-MPC2's encoding written out independently: floor/offset in symlog space."""
    bin_size = (vmax - vmin) / (num_bins - 1)
    s = torch.clamp(torch.sign(x) * torch.log1p(x.abs()), vmin, vmax).squeeze(-1)
    idx = torch.floor((s - vmin) / bin_size)
    off = ((s - vmin) / bin_size - idx).unsqueeze(-1)
    out = torch.zeros(*s.shape, num_bins)
    idx = idx.long().unsqueeze(-1)
    out.scatter_(-1, idx, 1 - off)
    out.scatter_add_(-1, (idx + 1) % num_bins, off)
    return out


def test_two_hot_matches_tdmpc2_and_round_trips():
    th = SymlogTwoHot(101, -10, 10)
    x = torch.cat([torch.linspace(-500, 500, 301), torch.tensor([0.0, 1e-3, -1e-3, 7.3])]).unsqueeze(-1)
    enc = th.encode(x)
    assert enc.shape == (x.shape[0], 101)
    assert torch.allclose(enc.sum(-1), torch.ones(x.shape[0]), atol=1e-6)
    assert torch.allclose(enc, _tdmpc2_two_hot(x), atol=1e-5)
    # decode(log(two_hot(x))) recovers x: exact up to the float error of the bin interpolation
    dec = th.decode(torch.log(enc.clamp_min(1e-30)))
    assert torch.allclose(dec, x, rtol=1e-4, atol=1e-4)
    # cross entropy equals the explicit soft CE
    logits = torch.randn(x.shape[0], 101)
    ce = th.cross_entropy(logits, x)
    ref = -(_tdmpc2_two_hot(x) * F.log_softmax(logits, -1)).sum(-1)
    assert torch.allclose(ce, ref, atol=1e-5)


def test_decode_uniform_logits_is_zero():
    th = SymlogTwoHot()
    assert th.decode(torch.zeros(3, 101)).abs().max() < 1e-5


def test_parts_are_tensordict_modules_with_keys():
    wm = tiny_model()
    assert wm.encoder.in_keys == ["observation"] and wm.encoder.out_keys == ["latent"]
    td = TensorDict(observation=torch.randn(4, 5), action=torch.rand(4, 2), batch_size=[4])
    wm.encoder(td)
    assert td["latent"].shape == (4, 16)
    wm.dynamics(td)
    wm.reward_head(td)
    wm.qvalue(td)
    wm.target_qvalue(td)
    wm.policy_head(td)
    assert td["next_latent"].shape == (4, 16)
    assert td["reward_logits"].shape == (4, 101)
    assert td["q_logits"].shape == (4, 2, 101)  # [*B, K, bins]; the 1M size has 2 Q heads
    assert td["target_q_logits"].shape == (4, 2, 101)
    assert torch.equal(td["q_logits"].movedim(-2, 0), wm.q_logits(td["latent"], td["action"]))
    assert td["pi_mean"].shape == td["pi_log_std"].shape == (4, 2)
    out = wm(TensorDict(observation=torch.randn(3, 5), action=torch.rand(3, 2), batch_size=[3]))
    for key, shape in [("latent", (3, 16)), ("next_latent", (3, 16)), ("reward", (3, 1)),
                       ("state_action_value", (3, 1))]:
        assert out[key].shape == shape


def test_planner_interface_shapes():
    wm = tiny_model(num_q=5)
    z = wm.encode(torch.randn(6, 4, 5))  # arbitrary batch dims
    a = torch.rand(6, 4, 2) * 2 - 1
    assert wm.reward(z, a).shape == (6, 4, 1)
    assert wm.value(z, a, "all").shape == (5, 6, 4, 1)
    assert wm.value(z, a, "avg").shape == (6, 4, 1)
    assert wm.value(z, a, "min").shape == (6, 4, 1)
    assert wm.value_disagreement(z, a).shape == (6, 4, 1)
    q, u = wm.value_and_disagreement(z, a)
    assert q.shape == u.shape == (6, 4, 1)
    action, mean, log_std = wm.policy(z)
    assert action.shape == mean.shape == log_std.shape == (6, 4, 2)
    assert action.abs().max() <= 1 and mean.abs().max() <= 1
    assert (log_std >= -10).all() and (log_std <= 2).all()
    det = wm.policy(z, deterministic=True)[0]
    assert torch.equal(det, mean)
    with pytest.raises(ValueError, match="reduce"):
        wm.value(z, a, "max")


def test_q_ensemble_is_one_batched_op_equal_to_per_head_mlps():
    torch.manual_seed(0)
    ens = EnsembleMLP(4, 6, [8, 8], 3).eval()
    with torch.no_grad():
        for p in ens.parameters():
            p.normal_()
    x = torch.randn(5, 6)
    out = ens(x)
    for k in range(4):
        h = x
        for i in range(3):
            h = F.linear(h, getattr(ens, f"weight_{i}")[k], getattr(ens, f"bias_{i}")[k])
            if i < 2:
                h = F.mish(F.layer_norm(h, (8,), getattr(ens, f"ln_weight_{i}")[k], getattr(ens, f"ln_bias_{i}")[k]))
        assert torch.allclose(out[k], h, atol=1e-5)
    # the member subset path matches too
    sub = ens(x, members=torch.tensor([3, 1]))
    assert torch.allclose(sub, out[[3, 1]], atol=1e-6)
    # and the whole ensemble forward launches one matmul per layer, not one per head (matmul calls counted)
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "baddbmm")
            return func(*args, **(kwargs or {}))

    with CountMatmuls() as counter:
        ens(x)
    assert counter.calls == 3  # 3 layers, 4 heads: addmm for the shared first layer, baddbmm for the others


def test_target_q_is_buffers_and_dropout_only_in_training():
    wm = tiny_model()
    params = {id(p) for p in wm.parameters()}
    assert all(id(b) not in params for b in wm.target_q_ensemble.buffers())
    assert not any(b.requires_grad for b in wm.target_q_ensemble.buffers())
    assert len(list(wm.target_q_ensemble.parameters())) == 0
    z = wm.encode(torch.randn(3, 5))
    a = torch.zeros(3, 2)
    wm.eval()
    assert torch.equal(wm.q_logits(z, a), wm.q_logits(z, a))
    wm.train()
    with torch.no_grad():  # (zero-initialized output layer: every logit 0, with or without dropout)
        for param in wm.q_ensemble.parameters():
            param.add_(0.1)
    zz, aa = wm.encode(torch.randn(64, 5)), torch.zeros(64, 2)
    assert not torch.equal(wm.q_logits(zz, aa), wm.q_logits(zz, aa))  # Q dropout (TD-MPC2's 0.01) in training
    assert wm.target_qvalue.training is False
    assert torch.equal(wm.q_logits(z, a, target=True), wm.q_logits(z, a, target=True))


@pytest.mark.parametrize("size", sorted(MODEL_SIZES))
def test_model_sizes(size):
    if size >= 48:
        # build on the meta device: the check is about architecture, not memory
        with torch.device("meta"):
            wm = TDMPC2WorldModel(24, 6, model_size=size)
    else:
        wm = TDMPC2WorldModel(24, 6, model_size=size)
    n = wm.num_params / 1e6
    # TD-MPC2 names sizes by their approximate parameter count (single-task, no task embedding: 0.95-1.22x here)
    assert 0.9 * size < n < 1.3 * size, (size, n)
    assert wm.config.num_q == {1: 2, 5: 5, 19: 5, 48: 5, 317: 8}[size]  # TD-MPC2's table, not ours again


def test_bad_model_size_and_overrides():
    with pytest.raises(ValueError, match="model_size 3"):
        TDMPC2WorldModel(5, 1, model_size=3)
    with pytest.raises(TypeError, match="latnet_dim"):
        TDMPC2WorldModel(5, 1, model_size=1, latnet_dim=8)


def test_check_inputs_errors_name_the_problem():
    wm = tiny_model()
    with pytest.raises(ValueError, match="observation has width 7.*width 5"):
        wm.check_inputs(obs=torch.randn(2, 7))
    with pytest.raises(ValueError, match="action has width 3.*width 2"):
        wm.check_inputs(action=torch.randn(2, 3))
    with pytest.raises(ValueError, match="NaN/inf"):
        wm.check_inputs(obs=torch.tensor([[0.0, 1.0, float("nan"), 0.0, 0.0]]))
    wm.check_inputs(obs=torch.randn(2, 5), action=torch.randn(2, 2))  # fine


def test_discount_heuristic():
    assert discount_from_episode_length(500) == pytest.approx(0.99)
    assert discount_from_episode_length(100) == pytest.approx(0.95)
    assert discount_from_episode_length(1000) == pytest.approx(0.995)
    assert discount_from_episode_length(10) == pytest.approx(0.95)


def test_policy_entropy_matches_gaussian_formula():
    wm = tiny_model()
    z = wm.encode(torch.randn(64, 5))
    torch.manual_seed(3)
    action, entropy, scaled = wm.policy_with_entropy(z)
    mean, log_std = wm.policy_params(z)
    torch.manual_seed(3)
    eps = torch.randn_like(mean)
    pre = mean + eps * log_std.exp()
    dist = torch.distributions.Normal(mean, log_std.exp())
    logp = dist.log_prob(pre).sum(-1, keepdim=True) - torch.log(1 - torch.tanh(pre) ** 2 + 1e-6).sum(-1, keepdim=True)
    assert torch.allclose(action, torch.tanh(pre), atol=1e-6)
    assert torch.allclose(entropy, -logp, atol=1e-4)
    gauss = dist.log_prob(pre).sum(-1, keepdim=True)
    assert torch.allclose(scaled, -logp * (2 * gauss) / (logp + 1e-8), rtol=1e-4, atol=1e-4)
    assert math.isfinite(float(scaled.mean()))


def test_tdmpc2_scaled_entropy_raises_log_std_whatever_the_squash():
    """TD-MPC2's scaled entropy is, up to its 1e-8, the pre-squash Gaussian's ``-A log N(eps; 0, sigma)``: its
    gradient is +A on each log-std and 0 on the mean, at an unsaturated and at a saturated mean alike (the tanh
    correction cancels out of TD-MPC2's ratio). docs/algorithms.md explains what this does to the prior."""
    wm = tiny_model()
    z = wm.encode(torch.randn(16, 5)).detach()
    A = wm.action_dim
    grads = []
    for shift in (0.0, 8.0):  # tanh(8 + sigma * eps) is ±1 to float precision for most draws
        mean, log_std = wm.policy_params(z)
        mean, log_std = (mean.detach() + shift).requires_grad_(True), log_std.detach().requires_grad_(True)
        wm.policy_params = lambda _z, m=mean, s=log_std: (m, s)  # the head's outputs, as leaves
        torch.manual_seed(5)
        _, _, scaled = wm.policy_with_entropy(z)
        del wm.policy_params
        d_mean, d_log_std = torch.autograd.grad(scaled.sum(), (mean, log_std))
        assert torch.allclose(d_mean, torch.zeros_like(d_mean), atol=1e-4)
        torch.testing.assert_close(d_log_std, torch.full_like(d_log_std, float(A)), rtol=1e-3, atol=1e-3)
        grads.append(d_log_std)
    torch.testing.assert_close(grads[0], grads[1])


def test_dropout_mask_is_bernoulli():
    """The geometric-gap mask has the distribution of i.i.d. Bernoulli drops (rate, scale, no correlation)."""
    from torchrl_dreammpc.modules.layers import dropout, dropout_mask

    torch.manual_seed(0)
    for p in (0.01, 0.3):
        m = dropout_mask(torch.empty(400, 2500), p).flatten()
        n = m.numel()
        torch.testing.assert_close(m.unique(), torch.tensor([0.0, 1 / (1 - p)]))
        dropped = (m == 0).double()
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(dropped.mean().item() - p) < 5 * sd, (p, dropped.mean().item())
        # independence: neighbours (and elements 7 apart) are both dropped at rate p^2
        for lag in (1, 7):
            both = (dropped[lag:] * dropped[:-lag]).mean().item()
            assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n), (p, lag, both)
        # the first and the last element are dropped too (no edge effect of the gap walk)
        first_last = torch.stack([(dropout_mask(torch.empty(50), p)[[0, -1]] == 0) for _ in range(4000)]).double()
        assert (first_last.mean(0) - p).abs().max() < 5 * math.sqrt(p * (1 - p) / 4000)
    x = torch.randn(64, 32, requires_grad=True)
    y = dropout(x, 0.3)
    y.sum().backward()
    kept = y.detach() != 0
    torch.testing.assert_close(y.detach()[kept], x.detach()[kept] / 0.7)
    torch.testing.assert_close(x.grad, kept.float() / 0.7)  # gradient flows through kept elements only
    assert dropout(x, 0.3, training=False) is x
    with pytest.raises(ValueError, match="dropout probability"):
        dropout(x, 1.0)
