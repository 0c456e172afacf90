"""TDMPC2Loss / TDMPC2PolicyLoss: keys, gradients, target updates, learning on a known system, bad input, values
against hand computations and against TD-MPC2's reference agent (``../shared/peers/tdmpc2_peer.py``)."""
import copy
import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torchrl.objectives import SoftUpdate

from torchrl_dreammpc.modules import TDMPC2WorldModel
from torchrl_dreammpc.objectives import RunningScale, TDMPC2Loss, TDMPC2PolicyLoss, make_tdmpc2_optimizers

TINY = dict(enc_dim=64, mlp_dim=64, latent_dim=32)
OBS, ACT = 4, 2
PEER = Path(__file__).resolve().parents[1].parent / "shared" / "peers" / "tdmpc2_peer.py"


def tiny_model(**kw):
    torch.manual_seed(0)
    return TDMPC2WorldModel(OBS, ACT, model_size=1, **{**TINY, **kw})


def random_batch(B=16, H=3, obs=OBS, act=ACT, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDict({
        "observation": torch.randn(B, H, obs, generator=g),
        "action": torch.rand(B, H, act, generator=g) * 2 - 1,
        "next": {"observation": torch.randn(B, H, obs, generator=g),
                 "reward": torch.randn(B, H, 1, generator=g),
                 "terminated": torch.zeros(B, H, 1, dtype=torch.bool)},
    }, [B, H])


def linear_system_batch(B, H, g):
    """Transitions of a known system: x' = A x + B u, r = -|x|^2 + 0.1 u_0, episodes never terminate."""
    A = torch.tensor([[0.9, 0.2, 0.0, 0.0], [-0.2, 0.9, 0.0, 0.0], [0.0, 0.0, 0.8, 0.3], [0.0, 0.0, -0.3, 0.8]])
    Bm = torch.tensor([[0.5, 0.0], [0.0, 0.5], [0.3, 0.0], [0.0, 0.3]])
    x = torch.randn(B, OBS, generator=g)
    obs, act, nxt, rew = [], [], [], []
    for _ in range(H):
        u = torch.rand(B, ACT, generator=g) * 2 - 1
        x2 = x @ A.T + u @ Bm.T
        obs.append(x); act.append(u); nxt.append(x2)
        rew.append(-(x ** 2).sum(-1, keepdim=True) + 0.1 * u[:, :1])
        x = x2
    return TensorDict({
        "observation": torch.stack(obs, 1), "action": torch.stack(act, 1),
        "next": {"observation": torch.stack(nxt, 1), "reward": torch.stack(rew, 1),
                 "terminated": torch.zeros(B, H, 1, dtype=torch.bool)},
    }, [B, H])


def update(loss, pi_loss, optims, updater, td):
    wm = loss.world_model
    wm_optim, pi_optim = optims
    wm.train()
    out = loss(td)
    total = sum(v for k, v in out.items() if k.startswith("loss_"))
    total.backward()
    torch.nn.utils.clip_grad_norm_([p for g in wm_optim.param_groups for p in g["params"]], 20)
    wm_optim.step(); wm_optim.zero_grad(set_to_none=True)
    pi_out = pi_loss(out)
    pi_out["loss_pi"].backward()
    torch.nn.utils.clip_grad_norm_(wm.policy_parameters(), 20)
    pi_optim.step(); pi_optim.zero_grad(set_to_none=True)
    updater.step()
    wm.eval()
    return out, pi_out


def test_output_keys_and_coefficients():
    wm = tiny_model()
    loss = TDMPC2Loss(wm)
    out = loss(random_batch())
    assert {"loss_consistency", "loss_reward", "loss_value"} <= set(out.keys())
    assert "loss_termination" not in out.keys()
    assert out["latents"].shape == (4, 16, 32)  # [H+1, B, L]
    assert not out["latents"].requires_grad
    assert torch.allclose(out["loss_consistency"], 20 * out["consistency"])
    assert torch.allclose(out["loss_reward"], 0.1 * out["reward_ce"])
    assert torch.allclose(out["loss_value"], 0.1 * out["value_ce"])
    episodic = TDMPC2Loss(tiny_model(episodic=True))
    assert "loss_termination" in episodic(random_batch()).keys()


def test_loss_matches_explicit_per_head_per_step_computation():
    """The vectorized loss equals TD-MPC2's loop formulation (loops over time and heads), on a model with weights
    in every head (zero-initialized reward / Q heads would make those two terms constants)."""
    wm = perturb(tiny_model(num_q=3, dropout=0.0)).eval()
    loss = TDMPC2Loss(wm)
    td = random_batch(B=8, H=3, seed=1)
    torch.manual_seed(5)
    out = loss(td)
    torch.manual_seed(5)
    obs, act = td["observation"].transpose(0, 1), td["action"].transpose(0, 1)
    nobs, rew = td["next", "observation"].transpose(0, 1), td["next", "reward"].transpose(0, 1)
    with torch.no_grad():
        nz = wm.encode(nobs)
        td_target = rew + wm.discount * wm.value(nz, wm.policy(nz)[0], reduce="min", target=True)
    z = wm.encode(obs[0])
    cons, rl, vl = 0.0, 0.0, 0.0
    for t in range(3):
        zq = z
        rl = rl + wm.two_hot.cross_entropy(wm.reward_logits(zq, act[t]), rew[t]).mean() * 0.5 ** t
        for k in range(3):
            vl = vl + wm.two_hot.cross_entropy(wm.q_logits(zq, act[t])[k], td_target[t]).mean() * 0.5 ** t
        z = wm.next(z, act[t])
        cons = cons + F.mse_loss(z, nz[t]) * 0.5 ** t
    assert torch.allclose(out["consistency"], cons / 3, atol=1e-6)
    assert torch.allclose(out["reward_ce"], rl / 3, atol=1e-5)
    assert torch.allclose(out["value_ce"], vl / 9, atol=1e-5)


def perturb(wm, scale=0.3, seed=3):
    """Random values in every weight and different target Qs: zero-initialized heads would make the value target,
    the reward loss and the policy's Q term constants, and a test of them vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*wm.parameters(), *wm.target_q_ensemble.buffers()]:
            t.add_(scale * torch.randn(t.shape, generator=g))
    return wm


def test_terminations_enter_the_value_target_and_the_termination_loss():
    wm = perturb(tiny_model(num_q=2, episodic=True, dropout=0.0)).eval()
    loss = TDMPC2Loss(wm)
    td = random_batch(B=8, H=3, seed=4)
    terminated = torch.zeros(8, 3, 1, dtype=torch.bool)
    terminated[:3, -1] = True  # three sub-trajectories end on their last step
    terminated[5, 1] = True  # (and one earlier: the loss takes the flags as given)
    td["next", "terminated"] = terminated
    torch.manual_seed(11)
    out = loss(td)
    # by hand, time-major, with TD-MPC2's formulas written out
    torch.manual_seed(11)
    obs, act = td["observation"].transpose(0, 1), td["action"].transpose(0, 1)
    nobs, rew = td["next", "observation"].transpose(0, 1), td["next", "reward"].transpose(0, 1)
    term = terminated.transpose(0, 1).float()
    with torch.no_grad():
        nz = wm.encode(nobs)
        q_next = wm.two_hot.decode(wm.q_logits(nz, wm.policy(nz)[0], target=True)).min(0).values  # both heads
        target = rew + wm.discount * (1 - term) * q_next
    zs = [wm.encode(obs[0])]
    for t in range(3):
        zs.append(wm.next(zs[-1], act[t]))
    value = sum(0.5 ** t * wm.two_hot.cross_entropy(wm.q_logits(zs[t], act[t])[k], target[t]).mean()
                for t in range(3) for k in range(2)) / (3 * 2)
    p = torch.sigmoid(wm.termination_logits(torch.stack(zs[1:])))
    bce = -(term * torch.log(p) + (1 - term) * torch.log(1 - p)).mean()
    torch.testing.assert_close(out["value_ce"], value.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["termination_bce"], bce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss_termination"], bce.detach(), rtol=1e-5, atol=1e-6)  # coefficient 1
    # the flags matter: the same batch without them gives another value loss (bootstrapped terminal rows)
    assert (q_next[term.bool()].abs() > 1e-3).all()
    td["next", "terminated"] = torch.zeros_like(terminated)
    torch.manual_seed(11)
    assert abs(loss(td)["value_ce"].item() - out["value_ce"].item()) > 1e-4


def test_policy_loss_matches_a_hand_computation():
    wm = perturb(tiny_model(num_q=2, dropout=0.0)).eval()
    pi_loss = TDMPC2PolicyLoss(wm, entropy_coef=0.01)  # larger than TD-MPC2's 1e-4 so that the entropy term shows
    zs = wm.encode(torch.randn(4, 16, OBS, generator=torch.Generator().manual_seed(5))).detach()  # [H+1, B, L]
    torch.manual_seed(9)
    out = pi_loss(TensorDict({"latents": zs}, []))
    torch.manual_seed(9)
    with torch.no_grad():
        mean, log_std = wm.policy_params(zs)
        eps = torch.randn_like(mean)
        a = torch.tanh(mean + eps * log_std.exp())
        log_gauss = (-0.5 * eps ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1, keepdim=True)
        logp = log_gauss - torch.log(F.relu(1 - a ** 2) + 1e-6).sum(-1, keepdim=True)
        scaled_entropy = -logp * (ACT * log_gauss) / (logp + 1e-8)
        q = wm.two_hot.decode(wm.q_logits(zs, a)).mean(0)  # [H+1, B, 1]: the average of the two heads
        p5, p95 = np.percentile(q[0].flatten().numpy(), [5, 95])
        scale = 1.0 + 0.01 * (max(1.0, p95 - p5) - 1.0)  # RunningScale starts at 1, tau = 0.01
        per_step = -(0.01 * scaled_entropy + q / scale).mean(dim=(1, 2))
        expected = (per_step * 0.5 ** torch.arange(4)).mean()
    assert p95 - p5 > 1.0  # the scale actually moves
    assert out["pi_scale"].item() == pytest.approx(scale, rel=1e-5)
    torch.testing.assert_close(out["loss_pi"].detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["pi_scaled_entropy"], scaled_entropy.mean(), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tdmpc2_peer():
    if not PEER.is_file():
        pytest.skip(f"TD-MPC2's reference agent {PEER} is not here (the ../shared folder is absent)")
    spec = importlib.util.spec_from_file_location("tdmpc2_peer", PEER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_losses_equal_tdmpc2_reference_agent(tdmpc2_peer, monkeypatch):
    """Our TDMPC2Loss / TDMPC2PolicyLoss on the weights of TD-MPC2's own agent and on its batch give the
    consistency, reward, value and policy losses that its ``_update`` / ``update_pi`` compute. Dropout 0 and two Q
    heads on both sides; the policy's sampling noise is zero on both sides (``torch.randn_like`` → zeros), so
    nothing random differs."""
    from torchrl_dreammpc.checkpoints import from_tdmpc2_checkpoint

    torch.manual_seed(0)
    agent = tdmpc2_peer.make_agent(model_size=1, obs_dim=5, action_dim=2, num_q=2, dropout=0.0, batch_size=32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random values everywhere (the reference zero-initializes its reward and Q outputs)
        for t in agent.model.parameters():
            t.add_(0.1 * torch.randn(t.shape, generator=g))
        for t in agent.model._target_Qs_params.values(True, True):  # (a clone, not among the parameters)
            t.add_(0.3 * torch.randn(t.shape, generator=g))
    obs, action, reward, terminated = tdmpc2_peer.random_batch(agent, seed=2)
    terminated[-1, :5] = 1.0
    wm = from_tdmpc2_checkpoint({"model": agent.model.state_dict()}, obs_dim=5, action_dim=2, episode_length=500)
    assert wm.config.num_q == 2 and wm.discount == agent.discount
    batch = TensorDict({"observation": obs[:-1].transpose(0, 1), "action": action.transpose(0, 1),
                        "next": {"observation": obs[1:].transpose(0, 1), "reward": reward.transpose(0, 1),
                                 "terminated": terminated.transpose(0, 1).bool()}}, [32, 3])
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: torch.zeros_like(x, **kw))
    out = TDMPC2Loss(wm)(batch)
    ours_pi = TDMPC2PolicyLoss(wm)(out)
    # the reference's policy loss first (update_pi steps its policy: restored before _update reads it)
    pi_state = copy.deepcopy(agent.model._pi.state_dict())
    ref_pi = agent.update_pi(out["latents"].clone(), None)
    agent.model._pi.load_state_dict(pi_state)
    ref = agent._update(obs, action, reward, terminated)
    for ours_key, ref_key in (("consistency", "consistency_loss"), ("reward_ce", "reward_loss"),
                              ("value_ce", "value_loss")):
        torch.testing.assert_close(out[ours_key], ref[ref_key], rtol=1e-5, atol=1e-6, msg=ours_key)
    torch.testing.assert_close(ours_pi["loss_pi"].detach(), ref_pi["pi_loss"].detach(), rtol=1e-5, atol=1e-6)
    assert out["value_ce"] > 0.1 and out["reward_ce"] > 0.1 and out["consistency"] > 1e-4  # not trivially 0
    # the termination flags reached the value target (so a dropped (1 - terminated) would fail the comparison)
    batch["next", "terminated"] = torch.zeros_like(batch["next", "terminated"])
    assert abs(TDMPC2Loss(wm)(batch)["value_ce"] - out["value_ce"]) > 1e-3


def test_targets_get_no_gradients_and_soft_update_moves_by_tau():
    wm = tiny_model()
    loss, pi_loss = TDMPC2Loss(wm), TDMPC2PolicyLoss(wm)
    updater = SoftUpdate(loss, tau=0.01)
    # make online and target differ so the update is visible
    with torch.no_grad():
        for p in wm.q_ensemble.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    out = loss(random_batch())
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    for b in wm.target_q_ensemble.buffers():
        assert b.grad is None and not b.requires_grad
    assert all(p.grad is not None for p in wm.q_ensemble.parameters())
    # the world-model loss sends no gradient to the policy
    assert all(p.grad is None for p in wm.policy_parameters())
    pi_out = pi_loss(out)
    wm.zero_grad()
    pi_out["loss_pi"].backward()
    # the policy loss trains only the policy
    assert all(p.grad is not None for p in wm.policy_parameters())
    assert all(p.grad is None for p in wm.q_ensemble.parameters())
    assert all(p.grad is None for p in wm.encoder.parameters())
    before = [b.clone() for b in wm.target_q_ensemble.buffers()]
    online = [p.detach().clone() for p in wm.q_ensemble.parameters()]
    updater.step()
    for b0, b1, s in zip(before, wm.target_q_ensemble.buffers(), online):
        assert torch.allclose(b1, b0 + 0.01 * (s - b0), atol=1e-7)
        assert not torch.equal(b1, b0)


def test_loss_decreases_on_fixed_batch():
    wm = tiny_model()
    loss, pi_loss = TDMPC2Loss(wm), TDMPC2PolicyLoss(wm)
    optims = make_tdmpc2_optimizers(wm, lr=1e-3)
    updater = SoftUpdate(loss, tau=0.01)
    td = random_batch(B=32)
    first = None
    for _ in range(60):
        out, _ = update(loss, pi_loss, optims, updater, td)
        total = float(sum(v.detach() for k, v in out.items() if k.startswith("loss_")))
        first = total if first is None else first
    assert total < 0.5 * first, (first, total)


def test_learns_known_linear_system():
    """A few hundred updates on a known linear system: reward and consistency losses fall by a large factor."""
    torch.manual_seed(0)
    wm = TDMPC2WorldModel(OBS, ACT, model_size=1, **TINY)
    loss, pi_loss = TDMPC2Loss(wm), TDMPC2PolicyLoss(wm)
    optims = make_tdmpc2_optimizers(wm, lr=3e-3)
    updater = SoftUpdate(loss, tau=0.01)
    g = torch.Generator().manual_seed(0)
    data = [linear_system_batch(64, 3, g) for _ in range(20)]
    held_out = linear_system_batch(256, 3, g)

    def evaluate():
        with torch.no_grad():
            out = loss(held_out)
            # consistency relative to the spread of the target latents (SimNorm latents can collapse to a
            # constant, which would make MSE trivially small): compare to the variance of encoded next obs
            nz = wm.encode(held_out["next", "observation"])
            return float(out["reward_ce"]), float(out["consistency"]), float(nz.var(0).mean())

    r0, c0, _ = evaluate()
    for i in range(300):
        update(loss, pi_loss, optims, updater, data[i % len(data)])
    r1, c1, spread = evaluate()
    assert r1 < r0 / 3, (r0, r1)
    assert c1 < c0 / 3, (c0, c1)
    assert c1 < 0.2 * spread, (c1, spread)  # predictions beat the trivial "predict the mean latent"
    # the decoded reward predictions track the true rewards
    with torch.no_grad():
        wm.eval()
        z = wm.encode(held_out["observation"][:, 0])
        pred = wm.reward(z, held_out["action"][:, 0])
        true = held_out["next", "reward"][:, 0]
        corr = torch.corrcoef(torch.stack([pred.squeeze(-1), true.squeeze(-1)]))[0, 1]
    assert corr > 0.9, corr


def test_running_scale_tracks_percentile_spread():
    s = RunningScale(tau=1.0)
    x = torch.linspace(0, 100, 101).unsqueeze(-1)  # P5 = 5, P95 = 95
    s.update(x)
    assert torch.allclose(s.value, torch.tensor([90.0]))
    s2 = RunningScale(tau=0.01)
    s2.update(x)
    assert torch.allclose(s2.value, torch.tensor([1.0 + 0.01 * 89.0]))
    s3 = RunningScale(tau=1.0)
    s3.update(torch.zeros(10, 1))
    assert torch.allclose(s3.value, torch.tensor([1.0]))  # clamped at 1


def test_policy_loss_scale_in_state_dict():
    wm = tiny_model()
    pi_loss = TDMPC2PolicyLoss(wm)
    pi_loss.scale.value.fill_(3.0)
    assert torch.equal(pi_loss.state_dict()["scale.value"], torch.tensor([3.0]))


def test_bad_batches_raise_clear_errors():
    wm = tiny_model()
    loss = TDMPC2Loss(wm)
    with pytest.raises(ValueError, match="observation has width 6"):
        loss(random_batch(obs=6))
    with pytest.raises(ValueError, match="action has width 3"):
        loss(random_batch(act=3))
    td = random_batch()
    td["next", "reward"][2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf.*reward"):
        loss(td)
    td = random_batch()
    td["observation"][0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf.*'observation'"):
        loss(td)
    flat = random_batch().reshape(-1)
    with pytest.raises(ValueError, match=r"batch size \[B, H\]"):
        loss(flat)
    # every entry is required, none is defaulted
    for key in ("action", ("next", "terminated"), ("next", "reward")):
        td = random_batch()
        del td[key]
        with pytest.raises(KeyError, match=rf"needs \[{re.escape(repr(key))}\] in the batch"):
            loss(td)
    td = random_batch()
    td["next", "reward"] = td["next", "reward"].squeeze(-1)
    with pytest.raises(ValueError, match=r"\('next', 'reward'\) must have shape \[B, H, 1\] = \[16, 3, 1\] \(B sub-trajectories of H steps\), got \[16, 3\]"):
        loss(td)
    td = random_batch()
    td["next", "terminated"] = torch.zeros(16, 3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\('next', 'terminated'\) must have shape \[B, H, 1\]"):
        loss(td)
    for kwargs, name in ((dict(reward_coef=float("inf")), "reward_coef"), (dict(rho=float("nan")), "rho"),
                         (dict(discount=1.5), "discount"), (dict(validate="yes"), "validate")):
        with pytest.raises(ValueError, match=name):
            TDMPC2Loss(wm, **kwargs)
    for kwargs, name in ((dict(entropy_coef=float("inf")), "entropy_coef"), (dict(scale_tau=2.0), "scale_tau")):
        with pytest.raises(ValueError, match=name):
            TDMPC2PolicyLoss(wm, **kwargs)
    with pytest.raises(ValueError, match="rho"):
        TDMPC2Loss(wm, rho=0.0)
    with pytest.raises(ValueError, match="lr"):
        make_tdmpc2_optimizers(wm, lr=-1.0)


def test_set_keys_renames_inputs():
    wm = tiny_model()
    loss = TDMPC2Loss(wm)
    loss.set_keys(observation="obs", reward="rew")
    td = random_batch()
    td.rename_key_("observation", "obs")
    td.rename_key_(("next", "observation"), ("next", "obs"))
    td.rename_key_(("next", "reward"), ("next", "rew"))
    out = loss(td)
    assert torch.isfinite(out["loss_value"])


def test_optimizer_groups_follow_tdmpc2():
    wm = tiny_model()
    wm_optim, pi_optim = make_tdmpc2_optimizers(wm, lr=3e-4, enc_lr_scale=0.3)
    assert wm_optim.param_groups[0]["lr"] == pytest.approx(0.3 * 3e-4)
    assert wm_optim.param_groups[1]["lr"] == pytest.approx(3e-4)
    wm_ids = {id(p) for g in wm_optim.param_groups for p in g["params"]}
    pi_ids = {id(p) for p in pi_optim.param_groups[0]["params"]}
    assert not wm_ids & pi_ids
    assert wm_ids | pi_ids == {id(p) for p in wm.parameters()}
    assert pi_optim.param_groups[0]["eps"] == 1e-5


@pytest.mark.slow
def test_compiled_update_runs_and_matches_eager():
    wm = tiny_model(dropout=0.0)
    loss = TDMPC2Loss(wm, validate=False)
    td = random_batch(B=8)

    def total(td):
        out = loss(td)
        return out["loss_consistency"] + out["loss_reward"] + out["loss_value"]

    compiled = torch.compile(total)
    torch.manual_seed(0)
    eager_val = total(td)
    torch.manual_seed(0)
    comp_val = compiled(td)
    assert torch.allclose(eager_val, comp_val, rtol=1e-4, atol=1e-5)
    comp_val.backward()
    assert all(p.grad is not None for p in wm.q_ensemble.parameters())


def test_losses_follow_the_model_s_device_and_moves():
    """(No GPU in CI: the "meta" device and a dtype move stand in for CUDA.) The policy loss's running scale is
    built on the model's device (the trainer builds the losses after moving the model), and moving a TD-MPC2 loss
    keeps its target views on the model's own tensors, which a target updater built afterwards must update."""
    from torchrl_dreammpc.modules import BMPCWorldModel
    from torchrl_dreammpc.objectives import BMPCPolicyLoss

    for loss in (TDMPC2PolicyLoss(tiny_model().to("meta")), BMPCPolicyLoss(BMPCWorldModel(OBS, ACT, **TINY).to("meta"))):
        assert {buffer.device.type for buffer in loss.scale.buffers()} == {"meta"}
    wm = tiny_model()
    loss = TDMPC2Loss(wm).to(torch.float64)
    updater = SoftUpdate(loss, tau=0.5)
    targets = list(wm.target_q_ensemble.buffers())
    assert targets[0].dtype == torch.float64
    views = list(loss.target_qvalue_params.values(True, True))
    assert {view.data_ptr() for view in views} == {target.data_ptr() for target in targets}
    with torch.no_grad():
        for param in wm.q_ensemble.parameters():
            param.add_(1.0)
    before = [target.clone() for target in targets]
    updater.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, targets))  # the model's targets moved

