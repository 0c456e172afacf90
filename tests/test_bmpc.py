"""BMPC as a second training algorithm: the V-function model behind the planners' seam, its losses and stepper,
the expert distribution in the replay buffer, the lazy reanalyze, checkpoints, config, resume. Tiny models.
(Equivalence with BMPC's own code: tests/test_bmpc_reference.py.)"""
from __future__ import annotations

import functools
import json

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_dreammpc.checkpoints import CheckpointError, load_any, load_world_model, save_world_model
from torchrl_dreammpc.envs import make_env
from torchrl_dreammpc.modules import BMPCConfig, BMPCPlanningOps, BMPCWorldModel, TDMPC2WorldModel, WorldModelBase
from torchrl_dreammpc.modules.base import state_action_trajectory_values
from torchrl_dreammpc.objectives import BMPCLoss, BMPCPolicyLoss, TDMPC2Loss
from torchrl_dreammpc.planners import GradientMPCPlanner, MPPIPlanner, PolicyActor
from torchrl_dreammpc.trainers import (
    BMPCOptimizationStepper,
    DreamMPCTrainer,
    LazyReanalyze,
    SliceReplayBufferTrainer,
    load_world_model_from_trainer_checkpoint,
    make_replay_buffer,
)
from torchrl_dreammpc.trainers.replay import EXPERT_KEYS, REPLAY_KEYS, mark_missing_experts

TINY = dict(enc_dim=32, mlp_dim=32, latent_dim=16)
RANDOM, EVAL = ExplorationType.RANDOM, ExplorationType.DETERMINISTIC
SMALL_MPPI = dict(num_samples=32, num_elites=4, num_pi_trajs=4, iterations=2)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def bmpc_model(obs_dim=5, action_dim=2, seed=0, perturb=True, **kw) -> BMPCWorldModel:
    torch.manual_seed(seed)
    wm = BMPCWorldModel(obs_dim, action_dim, model_size=1, **{**TINY, **kw})
    if perturb:  # the reward and V output layers start at zero: give every head something to say
        with torch.no_grad():
            for p in wm.parameters():
                p.add_(0.1 * torch.randn_like(p))
            wm.target_value_ensemble.load_state_dict(wm.value_ensemble.state_dict())
    return wm.eval()


def batch(B=8, H=3, obs_dim=5, action_dim=2, seed=0, expert=True) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    td = TensorDict({
        "observation": torch.randn(B, H, obs_dim, generator=g),
        "action": torch.rand(B, H, action_dim, generator=g) * 2 - 1,
        "next": {"observation": torch.randn(B, H, obs_dim, generator=g), "reward": torch.randn(B, H, 1, generator=g),
                 "terminated": torch.zeros(B, H, 1, dtype=torch.bool)},
    }, [B, H])
    if expert:
        td["expert", "loc"] = torch.rand(B, H, action_dim, generator=g) * 2 - 1
        td["expert", "scale"] = 0.1 + 0.5 * torch.rand(B, H, action_dim, generator=g)
    return td


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# the model behind the seam
# ---------------------------------------------------------------------------------------------------------
def test_v_model_answers_the_seam():
    wm = bmpc_model()
    z, a = wm.encode(torch.randn(4, 5)), torch.rand(4, 2) * 2 - 1
    assert wm.family == "bmpc" and isinstance(wm.config, BMPCConfig) and wm.value_ensemble_size == 2
    assert (wm.config.num_q, wm.config.log_std_min, wm.config.log_std_max) == (2, -3.0, 1.0)  # BMPC's config.yaml
    assert wm.state_value(z, reduce="all").shape == (2, 4, 1) and wm.state_value(z).shape == (4, 1)
    # value(z, a) is a state-action value: the one-step backup through the model (never V ignoring a)
    close(wm.value(z, a), wm.reward(z, a) + wm.discount * wm.state_value(wm.next(z, a)))
    assert not torch.allclose(wm.value(z, a), wm.value(z, -a))
    # the planners' value terms: V̄(z_H), no policy call (the terminal noise changes nothing); u over V at z_t
    zs, actions = torch.stack([z, wm.next(z, a)]), a.unsqueeze(0)
    v_H, u = wm.trajectory_values(zs, actions, torch.randn(4, 2), uncertainty=True)
    close(v_H, wm.state_value(zs[-1]))
    close(wm.trajectory_values(zs, actions, torch.randn(4, 2))[0], v_H)
    v = wm.state_value(zs, reduce="all")
    close(u, v.mean(0) * v.std(0))
    # a TD-MPC2 model keeps Q(z_H, π(z_H)) through the same seam
    q_model = _q_model_with_weights()
    eps = torch.randn(4, 2)
    close(q_model.trajectory_values(zs, actions, eps)[0], q_model.value(zs[-1], q_model.policy(zs[-1], eps=eps)[0]))


def test_bmpc_policy_head_and_exploration_prior():
    wm = bmpc_model()
    z, eps = wm.encode(torch.randn(64, 5)), 3 * torch.randn(64, 2)
    action, mean, log_std = wm.policy(z, eps=eps)
    close(mean, torch.tanh(wm.policy_head.module.net(z).chunk(2, -1)[0]))
    close(action, (mean + eps * log_std.exp()).clamp(-1, 1))  # clipped, not squashed
    assert (action.abs() == 1).any() and (log_std >= -3).all() and (log_std <= 1).all()
    with wm.exploration_prior():
        expl = wm.policy_params(z)[1]
        ops = wm.planning_ops()
        assert ops.explore
        close(ops.policy_params(z)[1], expl)
    assert (expl >= -2).all() and (expl > log_std).all()  # the [-2, 1] range from the same raw output
    assert not wm.planning_ops().explore and not wm.policy_head.module.explore


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="no termination model"):
        BMPCWorldModel(5, 2, model_size=1, episodic=True, **TINY)
    wm = bmpc_model()
    with pytest.raises(TypeError, match="a BMPCWorldModel trains with BMPCLoss"):
        TDMPC2Loss(wm)
    with pytest.raises(TypeError, match="BMPCLoss trains a BMPCWorldModel"):
        BMPCLoss(TDMPC2WorldModel(5, 2, model_size=1, **TINY))
    with pytest.raises(AttributeError):
        wm.q_ensemble


@pytest.mark.parametrize("rows", [3, 300])  # few rows and many rows take different paths
def test_planning_ops_equal_the_model(rows):
    wm = bmpc_model()
    ops = wm.planning_ops()
    assert isinstance(ops, BMPCPlanningOps)
    obs, a, eps = torch.randn(rows, 5), torch.rand(rows, 2) * 2 - 1, torch.randn(rows, 2)
    z = wm.encode(obs)
    for x, y in zip(ops.policy(z, eps=eps), wm.policy(z, eps=eps)):
        close(x, y)
    close(ops.policy_action(z, None), wm.policy(z, deterministic=True)[0])
    close(ops.state_value(z, reduce="all"), wm.state_value(z, reduce="all"))
    close(ops.state_value(z), wm.state_value(z))
    close(ops.value(z, a, "all"), wm.value(z, a, "all"))
    for x, y in zip(ops.value_and_disagreement(z, a), wm.value_and_disagreement(z, a)):
        close(x, y)


@pytest.mark.parametrize("B,N", [(2, 5), (4, 32)])  # the fused objective's few-rows and many-rows paths
@pytest.mark.parametrize("uncertainty", [False, True])
def test_planners_objective_in_the_v_model(B, N, uncertainty):
    """Σ γ^t r_t + γ^H V̄(z_H) and Σ_t mean·std of V at z_0..z_H, from plain model calls, equal the planners'."""
    wm = bmpc_model()
    planner = GradientMPCPlanner(wm, num_candidates=N)
    H, M = 3, B * N
    z0 = wm.encode(torch.randn(B, 5))
    actions = (torch.rand(H, M, 2) * 2 - 1).requires_grad_(True)
    ret, unc = planner.imagine(z0, actions, torch.randn(M, 2), uncertainty=uncertainty)
    z, zs, ref = z0.repeat_interleave(N, 0), [], 0.0
    zs.append(z)
    for t in range(H):
        ref = ref + wm.discount ** t * wm.reward(z, actions[t])
        z = wm.next(z, actions[t])
        zs.append(z)
    ref = ref + wm.discount ** H * wm.state_value(z)
    close(ret, ref)
    if uncertainty:
        v = torch.stack([wm.state_value(zt, reduce="all") for zt in zs])  # [H+1, K, M, 1]
        close(unc, (v.mean(1) * v.std(1)).sum(0))
    (g,), (g_ref,) = torch.autograd.grad(ret.sum(), actions), torch.autograd.grad(ref.sum(), actions)
    close(g, g_ref)


class SeamOnly(WorldModelBase):
    """A BMPC model seen only through the seam's methods (no planning ops, no attribute of the architecture)."""

    def __init__(self, wm):
        super().__init__()
        self.wm = wm
        self.action_dim, self.latent_dim, self.discount = wm.action_dim, wm.latent_dim, wm.discount
        self.in_keys, self.out_keys = ["observation"], ["latent"]

    def forward(self, td):
        return td

    def encode(self, obs):
        return self.wm.encode(obs)

    def next(self, z, a):
        return self.wm.next(z, a)

    def reward(self, z, a):
        return self.wm.reward(z, a)

    def value(self, z, a, reduce="avg"):
        return self.wm.value(z, a, reduce)

    def policy(self, z, deterministic=False, eps=None):
        return self.wm.policy(z, deterministic, eps)

    def state_value(self, z, eps=None, reduce="avg"):
        return self.wm.state_value(z, eps, reduce)

    def trajectory_values(self, zs, actions, terminal_eps=None, uncertainty=False):
        return self.wm.trajectory_values(zs, actions, terminal_eps, uncertainty)

    @property
    def value_ensemble_size(self):
        return self.wm.value_ensemble_size


@pytest.mark.parametrize("make", [
    lambda wm, g: GradientMPCPlanner(wm, uncertainty_weight=0.1, generator=g, diagnostics=True),
    lambda wm, g: GradientMPCPlanner(wm, num_candidates=8, iterations=2, uncertainty_weight=0.1,
                                     uncertainty_grad=True, generator=g),
    lambda wm, g: MPPIPlanner(wm, generator=g, uncertainty_weight=0.1, **SMALL_MPPI),
    lambda wm, g: PolicyActor(wm, generator=g),
], ids=["dream-mpc", "dream-mpc-ugrad", "mppi", "policy"])
def test_all_planners_plan_in_the_v_model_through_the_seam(make):
    wm = bmpc_model()
    fast, seam = make(wm, torch.Generator().manual_seed(3)), make(SeamOnly(wm), torch.Generator().manual_seed(3))
    obs = torch.randn(6, 5)
    for mode in (RANDOM, EVAL):
        with set_exploration_type(mode):
            a = fast(TensorDict({"observation": obs}, [6]))["action"]
            b = seam(TensorDict({"observation": obs}, [6]))["action"]
        assert a.shape == (6, 2) and torch.isfinite(a).all() and (a.abs() <= 1).all()
        close(a, b)


def test_dream_mpc_gradient_step_improves_the_v_objective():
    wm = bmpc_model()
    planner = GradientMPCPlanner(wm, num_candidates=5, iterations=3, lr=0.05, uncertainty_weight=0.1,
                                 diagnostics=True, generator=torch.Generator().manual_seed(0))
    with set_exploration_type(EVAL):
        out = planner(TensorDict({"observation": torch.randn(16, 5)}, [16]))
    assert (out["planner", "objective_after"] > out["planner", "objective_before"] + 0.05).all()  # (0.1-0.7 seen)
    assert (out["planner", "uncertainty"] != 0).all()  # the penalty is measured on the two V heads (mean·std)


# ---------------------------------------------------------------------------------------------------------
# the expert distribution
# ---------------------------------------------------------------------------------------------------------
def test_planners_write_their_expert_distribution():
    wm = bmpc_model()
    obs = TensorDict({"observation": torch.randn(6, 5)}, [6])
    # MPPI (BMPC's action_dist): the chosen elite's first action, the final std of the first step
    mppi = MPPIPlanner(wm, expert_key="expert", generator=torch.Generator().manual_seed(0), **SMALL_MPPI)
    assert ("expert", "loc") in mppi.out_keys
    with set_exploration_type(EVAL):
        out = mppi(obs.clone())
    close(out["expert", "loc"], out["action"])  # no exploration noise in evaluation: the action itself
    assert ((out["expert", "scale"] >= 0.05) & (out["expert", "scale"] <= 2.0)).all()
    with set_exploration_type(RANDOM):
        explored = mppi(obs.clone())
    assert not torch.allclose(explored["expert", "loc"], explored["action"])  # the action got noise, loc none
    # Dream-MPC: its executed action (before noise) and the prior's std at the state, clamped to [0.05, 2]
    dream = GradientMPCPlanner(wm, expert_key=("bmpc", "expert"), exploration_std=0.3,
                               generator=torch.Generator().manual_seed(0))
    with set_exploration_type(EVAL):
        out = dream(obs.clone())
    close(out["bmpc", "expert", "loc"], out["action"])
    prior_std = wm.policy_params(wm.encode(obs["observation"]))[1].exp()
    close(out["bmpc", "expert", "scale"], prior_std.clamp(0.05, 2.0))
    # the prior alone is no planner: it writes none (BMPC stores NaN then)
    prior = PolicyActor(wm, expert_key="expert")
    assert "expert" not in prior(obs.clone()).keys() and prior.out_keys == ["action"]
    # without expert_key nothing is written
    assert "expert" not in MPPIPlanner(wm, **SMALL_MPPI)(obs.clone()).keys()


def test_rows_without_a_planner_distribution_are_stored_as_nan():
    rows = TensorDict({"action": torch.zeros(4, 2)}, [4])
    marked = mark_missing_experts(rows.clone())
    assert torch.isnan(marked["expert", "loc"]).all() and torch.isnan(marked["expert", "scale"]).all()
    rows["expert", "loc"] = torch.ones(4, 2)
    rows["expert", "scale"] = torch.tensor([[0.5, 0.5], [0.0, 0.0], [0.3, float("nan")], [1.0, 2.0]])
    marked = mark_missing_experts(rows.clone())  # the collector's zero placeholders on random steps, NaN
    assert torch.isnan(marked["expert", "loc"][1:3]).all() and torch.isnan(marked["expert", "scale"][1:3]).all()
    assert torch.equal(marked["expert", "loc"][[0, 3]], torch.ones(2, 2))


# ---------------------------------------------------------------------------------------------------------
# losses and stepper
# ---------------------------------------------------------------------------------------------------------
def test_policy_loss_uses_standard_normal_where_there_is_no_expert():
    wm = bmpc_model()
    zs = wm.encode(torch.randn(4, 8, 5))
    loc, scale = torch.rand(3, 8, 2) * 2 - 1, 0.2 + torch.rand(3, 8, 2)
    holes = torch.zeros(3, 8, 1, dtype=torch.bool)
    holes[0, :3] = holes[2, 5] = True
    filled_loc = torch.where(holes, torch.zeros_like(loc), loc)
    filled_scale = torch.where(holes, torch.ones_like(scale), scale)
    outs = []
    for l, s in ((loc.masked_fill(holes, float("nan")), scale.masked_fill(holes, float("nan"))),
                 (loc.masked_fill(holes, float("nan")), scale.masked_fill(holes, 0.0)),
                 (filled_loc, filled_scale)):
        torch.manual_seed(0)
        outs.append(BMPCPolicyLoss(wm)(TensorDict({"latents": zs, "expert_loc": l, "expert_scale": s}, []))["loss_pi"])
    assert torch.isfinite(outs[0])
    close(outs[0], outs[2])
    close(outs[1], outs[2])
    with pytest.raises(ValueError, match="expects latents"):
        BMPCPolicyLoss(wm)(TensorDict({"latents": zs, "expert_loc": loc[:2], "expert_scale": scale[:2]}, []))
    # arguments: finite and in range, as for TDMPC2PolicyLoss (NaN passes a plain `< 0` test)
    for kwargs, name in (({"entropy_coef": float("nan")}, "entropy_coef"), ({"entropy_coef": -1.0}, "entropy_coef"),
                         ({"rho": 0.0}, "rho"), ({"scale_tau": float("inf")}, "scale_tau")):
        with pytest.raises(ValueError, match=name):
            BMPCPolicyLoss(wm, **kwargs)


def test_value_target_uses_the_loss_s_discount():
    """``BMPCLoss(discount=...)`` is the γ of the target r̂(z, a) + γ V̄_target(next(z, a)) (it was stored and
    ignored: the target used the model's discount)."""
    wm = bmpc_model().eval()
    td = batch()

    def target(discount):
        torch.manual_seed(3)  # the same a ~ π(z) for every discount
        return BMPCLoss(wm, discount=discount)(td)["value_target"]

    observations = torch.cat([td["observation"][:, :1], td["next", "observation"]], 1).transpose(0, 1)
    torch.manual_seed(3)
    with torch.no_grad():
        z = wm.encode(observations)[:-1]  # the latents of the H observations the targets are for
        reward = wm.reward(z, wm.policy(z)[0]).mean()
    v_bar = (target(0.5) - target(0.25)) / 0.25  # the target is linear in γ: r̂ + γ V̄
    assert abs(v_bar) > 1e-3
    close(target(0.5) - 0.5 * v_bar, reward)
    torch.manual_seed(3)
    close(BMPCLoss(wm)(td)["value_target"], reward + wm.discount * v_bar)  # default: the model's γ


def test_losses_decrease_on_a_fixed_batch():
    from torchrl_dreammpc.objectives.bmpc import normal_kl

    wm = bmpc_model(perturb=False)
    stepper = BMPCOptimizationStepper(BMPCLoss(wm), lr=1e-3)
    td = batch(B=32)

    def kl_to_experts():  # on the rollout latents the policy loss sees; unscaled (the running scale moves)
        with torch.no_grad():
            mean, log_std = wm.policy_params(stepper.loss_module(td)["latents"][:-1])
            loc, scale = td["expert", "loc"].transpose(0, 1), td["expert", "scale"].transpose(0, 1)
            return normal_kl(mean, log_std.exp(), loc, scale).mean()

    kl_first = kl_to_experts()
    first = stepper.step(None, td)
    for _ in range(100):
        last = stepper.step(None, td)
    for key in ("loss_consistency", "loss_reward", "loss_value"):
        assert last[key] < first[key], key
    assert kl_to_experts() < 0.7 * kl_first  # the policy imitates the (fixed) experts (measured: 3.5 -> 1.9)
    assert all(torch.isfinite(v) for v in last.values())


def test_stepper_skips_the_policy_during_pretraining_and_updates_v_targets():
    wm = bmpc_model()
    stepper = BMPCOptimizationStepper(BMPCLoss(wm))
    pi_before = [p.detach().clone() for p in wm.policy_parameters()]
    with torch.no_grad():  # targets away from the online heads: the 1 % shift then exceeds the tolerance
        for buffer in wm.target_value_ensemble.buffers():
            buffer.add_(0.5)
    target_before = [b.clone() for b in wm.target_value_ensemble.buffers()]
    metrics = stepper.step(None, batch(), pretrain=True)
    assert "loss_pi" not in metrics.keys() and "loss_value" in metrics.keys()
    assert all(torch.equal(a, b) for a, b in zip(pi_before, wm.policy_parameters()))
    for before, target, online in zip(target_before, wm.target_value_ensemble.buffers(),
                                      wm.value_ensemble.parameters()):
        close(target, torch.lerp(before, online.detach(), 0.01))  # BMPC's soft_update_target_Q, tau 0.01
    trainer = type("T", (), {"pretraining": True, "loss_module": stepper.loss_module})()
    assert "loss_pi" not in stepper.step(trainer, batch()).keys()
    trainer.pretraining = False
    metrics = stepper.step(trainer, batch())
    assert "loss_pi" in metrics.keys() and not wm.training
    assert any(not torch.equal(a, b) for a, b in zip(pi_before, wm.policy_parameters()))
    with pytest.raises(KeyError, match="planner's action distribution"):
        stepper.step(None, batch(expert=False))


# ---------------------------------------------------------------------------------------------------------
# lazy reanalyze
# ---------------------------------------------------------------------------------------------------------
def _filled_buffer(n=60, episode=20, action_dim=2):
    rb = make_replay_buffer(200, horizon=3, batch_size=8)
    g = torch.Generator().manual_seed(0)
    rows = TensorDict({
        "observation": torch.randn(n, 5, generator=g), "action": torch.rand(n, action_dim, generator=g),
        "next": {"observation": torch.randn(n, 5, generator=g), "reward": torch.randn(n, 1, generator=g),
                 "terminated": torch.zeros(n, 1, dtype=torch.bool), "truncated": torch.zeros(n, 1, dtype=torch.bool),
                 "done": torch.zeros(n, 1, dtype=torch.bool)},
        ("collector", "traj_ids"): torch.arange(n) // episode,
        "expert": {"loc": torch.full((n, action_dim), float("nan")), "scale": torch.full((n, action_dim), float("nan"))},
    }, [n])
    rb.extend(rows)
    return rb


def test_reanalyze_writes_the_new_expert_into_the_replay_storage():
    wm = bmpc_model()
    rb = _filled_buffer()
    before = rb[:].clone()
    replay = SliceReplayBufferTrainer(rb, 3, keys=REPLAY_KEYS + EXPERT_KEYS)
    planner = MPPIPlanner(wm, expert_key="expert", **SMALL_MPPI)
    hook = LazyReanalyze(planner, interval=2, num_slices=3, context=wm.exploration_prior, states_per_call=4)
    hook.replay_buffer = rb
    hook._trainer = type("T", (), {"pretraining": False})()
    first = hook(replay.sample())  # update 1 of 2: nothing
    assert torch.isnan(first["expert", "loc"]).all() and hook.updates == 1
    sample = replay.sample()
    out = hook(sample)  # update 2: the first 3 slices (9 states) re-planned
    assert hook.updates == 2 and hook.reanalyzed == 9
    loc, scale = out["expert", "loc"], out["expert", "scale"]
    assert not torch.isnan(loc[:3]).any() and torch.isnan(loc[3:]).all()
    assert ((scale[:3] >= 0.05) & (scale[:3] <= 2.0)).all()
    index = sample["index"][:3].reshape(-1)
    stored = rb[:]
    close(stored["expert", "loc"][index], loc[:3].reshape(9, 2))
    close(stored["expert", "scale"][index], scale[:3].reshape(9, 2))
    untouched = torch.ones(len(rb), dtype=torch.bool)
    untouched[index] = False
    assert torch.isnan(stored["expert", "loc"][untouched]).all()
    for key in ("observation", "action", ("next", "reward"), ("collector", "traj_ids")):
        assert torch.equal(stored[key], before[key])  # only the expert entries were written
    assert len(rb) == len(before)
    # the planner re-plans from scratch with the exploration prior, and leaves no warm start behind
    assert planner.last_plan is None and not wm.planning_ops().explore
    # no reanalyze (and no count) during pre-training
    hook._trainer.pretraining = True
    hook(replay.sample())
    assert hook.updates == 2
    with pytest.raises(ValueError, match="expert"):
        LazyReanalyze(MPPIPlanner(wm, **SMALL_MPPI))


@pytest.mark.slow
def test_a_compiled_update_compiles_the_reanalyze_planner_which_plans_the_same():
    from torchrl_dreammpc.trainers.bmpc import make_bmpc_update

    wm = bmpc_model()
    batch = TensorDict({"observation": torch.randn(4, 3, 5), "index": torch.arange(12).view(4, 3, 1),
                        "expert": {"loc": torch.full((4, 3, 2), float("nan")), "scale": torch.ones(4, 3, 2)}},
                       [4, 3])
    experts = {}
    for compile in (False, True):
        hook = make_bmpc_update(wm, compile=compile, reanalyze={"num_slices": 2, "planner": SMALL_MPPI})[2]
        assert hook.planner.compile_mode is compile
        torch.manual_seed(3)
        experts[compile] = hook.reanalyze(batch.clone())["expert"]
    assert not experts[True]["loc"][:2].isnan().any()
    close(experts[True]["loc"][:2], experts[False]["loc"][:2], atol=1e-4)  # (the other slices: NaN, untouched)
    close(experts[True]["scale"][:2], experts[False]["scale"][:2], atol=1e-4)
    # the planner's own setting wins
    hook = make_bmpc_update(wm, compile=True, reanalyze={"planner": {**SMALL_MPPI, "compile": False}})[2]
    assert hook.planner.compile_mode is False


# ---------------------------------------------------------------------------------------------------------
# the trainer: algorithm=bmpc end to end, resume, checkpoints
# ---------------------------------------------------------------------------------------------------------
REANALYZE = {"interval": 5, "num_slices": 4, "planner": SMALL_MPPI}


def make_trainer(tmp_path, *, world_model=None, total_frames=150, **kwargs) -> DreamMPCTrainer:
    world_model = world_model or bmpc_model(action_dim=1, perturb=False)
    defaults = dict(
        create_env_fn=functools.partial(make_env, "cartpole-swingup", seed=1), world_model=world_model,
        actor=GradientMPCPlanner(world_model, uncertainty_weight=0.1, expert_key="expert"),
        total_frames=total_frames, batch_size=8, seed=1, seed_frames=50, pretrain_updates=10, buffer_capacity=1000,
        eval_interval=0, eval_at_start=False, log_dir=tmp_path / "run", log_interval=50,
        checkpoint_dir=tmp_path / "run" / "checkpoints", checkpoint_interval=50, task="cartpole-swingup",
        planner_name="dream_mpc", verbose=False, algorithm="bmpc", algorithm_kwargs={"reanalyze": REANALYZE})
    defaults.update(kwargs)
    return DreamMPCTrainer(**defaults)


def test_bmpc_trainer_trains_reanalyzes_and_resumes(tmp_path):
    first = make_trainer(tmp_path, total_frames=150)
    assert isinstance(first.optimization_stepper, BMPCOptimizationStepper)
    first.train()
    (hook,) = first.algorithm_hooks
    assert isinstance(hook, LazyReanalyze)
    # 10 pre-training updates (no policy, no reanalyze), then one update per step: 100 counted, 20 reanalyzes
    assert first._optim_count == 110 and hook.updates == 100 and hook.reanalyzed == 20 * 4 * 3
    stored = first.replay_buffer[:]
    acted = ~torch.isnan(stored["expert", "loc"][50:]).any(-1)
    assert acted.all()  # every planner step stored Dream-MPC's distribution
    assert (stored["expert", "scale"][50:] >= 0.05).all()
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-000000000150" / "manifest.json").read_text())
    assert "trainer_module.reanalyze" in manifest["components"]
    assert manifest["metadata"]["fingerprint"]["algorithm"] == "bmpc"
    assert manifest["metadata"]["fingerprint"]["world_model"]["expl_log_std_min"] == -2.0

    second = make_trainer(tmp_path, world_model=bmpc_model(action_dim=1, seed=7, perturb=False), total_frames=200)
    second.resume()
    (hook2,) = second.algorithm_hooks
    assert (hook2.updates, hook2.reanalyzed) == (hook.updates, hook.reanalyzed)
    for a, b in zip(first.world_model.state_dict().values(), second.world_model.state_dict().values()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(second.replay_buffer[:]["expert", "loc"], stored["expert", "loc"], equal_nan=True)
    torch.testing.assert_close(second.optimization_stepper.policy_loss.scale.value,
                               first.optimization_stepper.policy_loss.scale.value)
    second.train()
    assert second.collected_frames == 200 and hook2.updates == 150
    # the world model of a BMPC trainer checkpoint comes back as a BMPCWorldModel with its weights
    reloaded, fingerprint = load_world_model_from_trainer_checkpoint(tmp_path / "run")
    assert isinstance(reloaded, BMPCWorldModel) and fingerprint["algorithm"] == "bmpc"
    for a, b in zip(reloaded.state_dict().values(), second.world_model.state_dict().values()):
        torch.testing.assert_close(a, b)
    # a TD-MPC2 run cannot resume a BMPC checkpoint
    tdmpc2 = TDMPC2WorldModel(5, 1, model_size=1, **TINY)
    other = make_trainer(tmp_path, world_model=tdmpc2, actor=GradientMPCPlanner(tdmpc2), algorithm="tdmpc2",
                         algorithm_kwargs=None, total_frames=300)
    with pytest.raises(ValueError, match="algorithm: checkpoint has 'bmpc', this run has 'tdmpc2'"):
        other.resume()
    with pytest.raises(TypeError, match="algorithm='bmpc' trains a world model of family 'bmpc', got a TDMPC2"):
        make_trainer(tmp_path / "x", world_model=tdmpc2, actor=GradientMPCPlanner(tdmpc2))


def test_checkpoint_formats_of_both_families(tmp_path):
    wm = bmpc_model()
    path = save_world_model(wm, tmp_path / "bmpc.pt")
    assert torch.load(path, weights_only=True)["family"] == "bmpc"
    loaded = load_world_model(path, expect_config=wm.config)
    assert isinstance(loaded, BMPCWorldModel) and loaded.config == wm.config
    for a, b in zip(wm.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="model family: checkpoint BMPCConfig, expected TDMPC2Config"):
        load_world_model(path, expect_config=TDMPC2WorldModel(5, 2, model_size=1, **TINY).config)
    # a TD-MPC2 file keeps the layout it had before families existed (no "family" entry) and loads as TD-MPC2's
    q_model = TDMPC2WorldModel(5, 2, model_size=1, **TINY)
    payload = torch.load(save_world_model(q_model, tmp_path / "q.pt"), weights_only=True)
    assert "family" not in payload and payload["version"] == 1
    assert type(load_world_model(tmp_path / "q.pt")) is TDMPC2WorldModel
    payload["family"] = "dreamer"
    torch.save(payload, tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match="world model of family 'dreamer'"):
        load_world_model(tmp_path / "unknown.pt")
    assert isinstance(load_any(path, 5, 2), BMPCWorldModel)


def test_bmpc_peer_checkpoint_layout_is_recognized():
    """A state dict laid out as BMPC's code saves it (TD-MPC2's keys, a V ensemble on the latent alone,
    expl_log_std_*) loads as a BMPCWorldModel; BMPC's Q variant is refused."""
    wm = bmpc_model()
    sd = wm.state_dict()
    peer = {}
    for key, value in sd.items():
        for ours, theirs in (("encoder.module.", "_encoder.state."), ("dynamics.module.net.", "_dynamics."),
                             ("reward_head.module.net.", "_reward."), ("policy_head.module.net.", "_pi.")):
            if key.startswith(ours):
                peer[theirs + key[len(ours):]] = value
        for ours, theirs in (("value_head.module.net.", "_Qs.params."), ("target_value_head.module.net.",
                                                                         "_target_Qs_params.")):
            if key.startswith(ours):
                name = key[len(ours):]
                layer = name.rsplit("_", 1)[1]
                kind = {"weight": "weight", "bias": "bias", "ln_weight": "ln.weight", "ln_bias": "ln.bias"}[
                    name.rsplit("_", 1)[0]]
                peer[f"{theirs}{layer}.{kind}"] = value
    peer.update(log_std_min=torch.tensor(-3.0), log_std_dif=torch.tensor(4.0), expl_log_std_min=torch.tensor(-2.0),
                expl_log_std_dif=torch.tensor(3.0))
    loaded = load_any(peer, 5, 2)
    assert isinstance(loaded, BMPCWorldModel) and loaded.config.expl_log_std_min == -2.0
    for key, value in sd.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    q_peer = {k: v for k, v in peer.items() if "Qs" not in k}
    q_model = TDMPC2WorldModel(5, 2, model_size=1, num_q=2, **TINY)
    for key, value in q_model.state_dict().items():
        if key.startswith("qvalue.module.net."):
            name = key[len("qvalue.module.net."):]
            kind = {"weight": "weight", "bias": "bias", "ln_weight": "ln.weight", "ln_bias": "ln.bias"}[
                name.rsplit("_", 1)[0]]
            q_peer[f"_Qs.params.{name.rsplit('_', 1)[1]}.{kind}"] = value
            q_peer[f"_target_Qs_params.{name.rsplit('_', 1)[1]}.{kind}"] = value
    with pytest.raises(CheckpointError, match="use_v_instead_q: false"):
        load_any(q_peer, 5, 2)


def test_planner_defaults_follow_the_model_family():
    from torchrl_dreammpc.trainers.builders import make_planner

    cfg = {"name": "dream_mpc", "uncertainty_weight": None}
    assert make_planner(cfg, bmpc_model()).uncertainty_weight == 0.1  # Dream-MPC with BMPC
    assert make_planner(cfg, TDMPC2WorldModel(5, 2, model_size=1, **TINY)).uncertainty_weight == 0.01
    assert make_planner({**cfg, "uncertainty_weight": 0.3}, bmpc_model()).uncertainty_weight == 0.3
    assert make_planner({"name": "mppi", "uncertainty_weight": None}, bmpc_model()).uncertainty_weight == 0.0


def _q_model_with_weights() -> TDMPC2WorldModel:
    """A TD-MPC2 model whose Q heads are not zero at their output (as initialized: every Q would be ~0)."""
    q_model = TDMPC2WorldModel(5, 2, model_size=1, num_q=2, **TINY).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in q_model.q_ensemble.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=g))
    return q_model


def test_trajectory_values_default_is_the_state_action_one():
    """The base class's default (a Q model) against a hand computation: Q̄(z_H, π(z_H)) and, with the uncertainty,
    mean·std over the heads of Q(z_t, a_t) for t < H and of Q(z_H, π(z_H))."""
    q_model = _q_model_with_weights()
    zs = q_model.encode(torch.randn(3, 4, 5))
    actions, eps = torch.rand(2, 4, 2) * 2 - 1, torch.randn(4, 2)
    a_H = q_model.policy(zs[-1], eps=eps)[0]
    q = torch.stack([q_model.value(z, a, reduce="all") for z, a in zip(zs, [*actions, a_H])], dim=1)  # [K, H+1, ...]
    for unc in (False, True):
        for got in (WorldModelBase.trajectory_values(q_model, zs, actions, eps, unc),
                    state_action_trajectory_values(q_model.planning_ops(), list(zs), actions, eps, unc)):
            close(got[0], q[:, -1].mean(0))  # (2 heads: their average)
            if unc:
                close(got[1], q.mean(0) * q.std(0))
    assert q[:, -1].std(0).mean() > 1e-3  # the heads disagree: the check is not 0 == 0
