"""DreamerV3 family: the world model behind WorldModelBase, the stateful acting path, TorchRL's DreamerV3 losses and
stepper, checkpoints, and training / resume / evaluation through the recipes. Tiny models (a 32-wide belief)."""
from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from torchrl.collectors import Collector
from torchrl.envs import StepCounter
from torchrl.trainers.algorithms import DreamerV3Optimizer, DreamerV3UpdateRatio

from torchrl_dreammpc.checkpoints import CheckpointError, load_any, load_world_model, save_world_model
from torchrl_dreammpc.envs import make_env, with_transforms
from torchrl_dreammpc.modules import DreamerV3WorldModel, TDMPC2WorldModel
from torchrl_dreammpc.objectives import DreamerV3CriticEnsembleLoss, DreamerV3TrainingLoss
from torchrl_dreammpc.planners import GradientMPCPlanner, MPPIPlanner, PolicyActor
from torchrl_dreammpc.planners.base import _imagine
from torchrl_dreammpc.trainers import load_world_model_from_trainer_checkpoint, read_eval_csv
from torchrl_dreammpc.trainers.dream_mpc import _UpdateSchedule
from torchrl_dreammpc.trainers.dreamer_v3 import make_dreamer_v3_update

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = dict(deter=32, hidden=16, stoch=4, classes=4, units=16, blocks=4)
TASK = "cartpole-swingup"  # observation width 5, action width 1
ROOT = Path(__file__).resolve().parents[1]
SMALL_MPPI = dict(num_samples=32, num_elites=4, iterations=2, num_pi_trajs=4)


def tiny_model(seed: int = 0, perturb: float = 0.0, **overrides) -> DreamerV3WorldModel:
    """A tiny DreamerV3 model; ``perturb`` adds noise to every weight so that zero-initialized heads (reward,
    critics) give non-trivial outputs."""
    torch.manual_seed(seed)
    model = DreamerV3WorldModel(5, 1, model_size="cpu", **{**TINY, **overrides})
    if perturb:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(perturb * torch.randn_like(param))
    return model.eval()


def acting_env(model, **kwargs):
    return with_transforms(functools.partial(make_env, TASK, seed=1, **kwargs), model.acting_transforms())()


def replay_batch(B: int = 4, T: int = 8, seed: int = 0) -> TensorDict:
    """``[B, T]`` real cartpole transitions (random actions)."""
    env = make_env(TASK, seed=seed)
    torch.manual_seed(seed)
    rollout = env.rollout(B * T, break_when_any_done=False)
    env.close()
    return rollout.select("observation", "action", ("next", "observation"), ("next", "reward"), ("next", "done"),
                          ("next", "terminated")).reshape(B, T)


# ---------------------------------------------------------------------------------------------------------------
# the model behind WorldModelBase
# ---------------------------------------------------------------------------------------------------------------
def test_planning_view_shapes_and_conventions():
    wm = tiny_model(perturb=0.05, num_critics=3)
    z = wm.encode(torch.randn(6, 5))
    a = torch.rand(6, 1) * 2 - 1
    assert z.shape == (6, wm.latent_dim) and wm.latent_dim == 4 * 4 + 32
    z_next = wm.next(z, a)
    # the stochastic part stays one-hot (the mode of each categorical), the belief is the GRU step
    assert torch.equal(z_next[:, :16].view(6, 4, 4).sum(-1), torch.ones(6, 4))
    # deterministic, and no draw from the global RNG (batched == single planning relies on it)
    rng = torch.random.get_rng_state()
    torch.testing.assert_close(wm.next(z, a), z_next)
    assert torch.equal(torch.random.get_rng_state(), rng)
    # reward: the reward head on the *next* latent; value: r + γ c V_k on the next latent, every critic (the
    # reference computed in float64 throughout: the planning view evaluates the two-hot heads in float64)
    ref = copy.deepcopy(wm).double()
    z64, a64 = z.double(), a.double()
    z_next64 = ref.next(z64, a64)
    reward64 = ref.two_hot(ref.reward_head(z_next64))
    torch.testing.assert_close(wm.reward(z, a).double(), reward64, rtol=1e-4, atol=1e-4)
    q_all = wm.value(z, a, reduce="all")
    cont = torch.sigmoid(ref.continue_head(z_next64))
    values = torch.stack([ref.two_hot(c(z_next64)) for c in ref.critics])
    assert q_all.shape == (3, 6, 1)
    torch.testing.assert_close(q_all.double(), reward64 + wm.discount * cont * values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(wm.value(z, a, reduce="avg"), q_all.mean(0))
    torch.testing.assert_close(wm.value(z, a, reduce="min"), q_all.min(0).values)
    v, u = wm.value_and_disagreement(z, a)
    torch.testing.assert_close(u, q_all.mean(0) * q_all.std(0))
    torch.testing.assert_close(wm.termination(z_next), 1 - torch.sigmoid(wm.continue_head(z_next)))
    assert wm.value_ensemble_size == 3 and abs(wm.discount - (1 - 1 / 333)) < 1e-12
    action, mean, log_std = wm.policy(z, eps=torch.zeros(6, 1))
    torch.testing.assert_close(action, mean)
    assert action.abs().max() <= 1 and log_std.exp().min() >= 0.1 - 1e-6 and log_std.exp().max() <= 1.0 + 1e-6
    # actions reach the reward through the straight-through categoricals
    a_var = a.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(wm.value(z, a_var).sum(), a_var)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reduce"):
        wm.value(z, a, reduce="max")
    # the whole model as a TensorDictModule (WorldModelBase.forward): the same history-free quantities
    obs = torch.randn(6, 5)
    out = wm(TensorDict(observation=obs, action=a, batch_size=[6]))
    torch.testing.assert_close(out[wm.latent_key], wm.encode(obs))
    torch.testing.assert_close(out["next_latent"], wm.next(wm.encode(obs), a))
    torch.testing.assert_close(out["reward"], wm.reward(wm.encode(obs), a))
    torch.testing.assert_close(out["state_action_value"], wm.value(wm.encode(obs), a, reduce="avg"))
    with pytest.raises(ValueError, match="width 7 .* DreamerV3WorldModel was built for observation width 5"):
        wm.check_inputs(obs=torch.randn(2, 7))
    with pytest.raises(ValueError, match="action contains 1 NaN"):
        wm.check_inputs(action=torch.tensor([[float("nan")]]))


def _float64_reference(head, z: torch.Tensor) -> torch.Tensor:
    """The head written out in float64: Linear, RMS norm ``x / sqrt(mean(x^2) + eps) * w``, SiLU."""
    x = z.double()
    for layer in head.model:
        if isinstance(layer, torch.nn.Linear):
            x = x @ layer.weight.double().T + layer.bias.double()
        elif isinstance(layer, torch.nn.SiLU):
            x = x * torch.sigmoid(x)
        else:  # the RMS norm
            x = x / torch.sqrt(x.square().mean(-1, keepdim=True) + layer.eps) * layer.weight.double()
    return x


def test_heads_are_decoded_in_float64():
    """DreamerV3's bins reach ±4.9e8: with some mass on the outer bins, the float32 decoded value is rounding noise
    (measured on a trained model: 0.3 for a 1e-6 change of the action); the planning view evaluates the reward and
    critic heads in float64, every layer (TorchRL's RMS norm computes in float32 whatever its input)."""
    wm = tiny_model()
    head = wm.critics[0]  # three hidden layers: three RMS norms
    with torch.no_grad():
        head.model[-1].weight.normal_(0, 0.3)
        head.model[-1].bias.copy_(-(torch.arange(255.0) - 127).abs() / 20)  # a fifth of the mass beyond |b| > 100
    z = torch.randn(256, wm.latent_dim, dtype=torch.float64)
    step = 1e-6 * torch.randn_like(z)
    exact = wm.two_hot(_float64_reference(head, z))
    exact_change = wm.two_hot(_float64_reference(head, z + step)) - exact
    decoded = wm.decode_head(head, z)
    assert decoded.dtype == torch.float64 and wm.decode_head(head, z.float()).dtype == torch.float32
    torch.testing.assert_close(decoded, exact, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(wm.decode_head(head, z + step) - decoded, exact_change, rtol=1e-6, atol=1e-9)
    # what the float32 evaluation, and float64 weights through TorchRL's float32 norm, lose
    float32 = wm.two_hot(head(z.float())).double()
    assert (float32 - exact).abs().max() > 1e-2
    float64_weights = wm.two_hot(torch.func.functional_call(
        head, {k: v.double() for k, v in head.named_parameters()}, (z,)))
    assert (float64_weights - exact).abs().max() > 1e-3
    # the planning view's heads go through it; gradients reach the latent and the weights
    torch.testing.assert_close(wm.state_values(z)[0], decoded)
    z_var = z.clone().requires_grad_(True)
    wm.decode_head(head, z_var).sum().backward()
    assert z_var.grad.abs().sum() > 0 and head.model[0].weight.grad.abs().sum() > 0
    odd = copy.deepcopy(head)
    odd.model.append(torch.nn.Dropout())
    with pytest.raises(TypeError, match="has a Dropout"):
        wm.decode_head(odd, z)


def test_fused_imagine_equals_the_generic_objective():
    wm = tiny_model(perturb=0.02)

    class Generic:  # the model without its fused imagine: the planners' generic path
        def __getattr__(self, name):
            if name == "imagine":
                raise AttributeError(name)
            return getattr(wm, name)

    z0 = wm.encode(torch.randn(2, 5))
    actions = torch.rand(3, 10, 1) * 2 - 1
    eps = torch.randn(10, 1)
    weights = (wm.discount ** torch.arange(4.0)).view(-1, 1, 1)
    # force a predicted episode end in some rows (not all), so that the termination masking is exercised
    with torch.no_grad():
        wm.continue_head.model[-1].bias.fill_(-1.0)
        z, ended = z0.repeat_interleave(5, 0), []
        for a in actions:
            z = wm.next(z, a)
            ended.append(wm.continuation(z) < 0.5)
        assert 0 < torch.cat(ended).float().mean() < 1
    for uncertainty in (False, True):
        for terminal_eps in (None, eps):
            ret, unc = _imagine(wm, z0, actions, terminal_eps, weights, uncertainty)
            ret_ref, unc_ref = _imagine(Generic(), z0, actions, terminal_eps, weights, uncertainty)
            torch.testing.assert_close(ret, ret_ref, rtol=1e-4, atol=1e-4)
            if uncertainty:
                torch.testing.assert_close(unc, unc_ref, rtol=1e-4, atol=1e-4)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model_size"):
        DreamerV3WorldModel(5, 1, model_size="3m")
    with pytest.raises(ValueError, match="divisible by blocks"):
        DreamerV3WorldModel(5, 1, model_size="cpu", deter=30, blocks=4)
    with pytest.raises(TypeError, match="Unknown DreamerV3Config"):
        DreamerV3WorldModel(5, 1, model_size="cpu", latent_dim=3)
    with pytest.raises(ValueError, match="num_critics"):
        DreamerV3WorldModel(5, 1, model_size="cpu", num_critics=0)


# ---------------------------------------------------------------------------------------------------------------
# acting with memory
# ---------------------------------------------------------------------------------------------------------------
def test_acting_path_carries_the_rssm_state_and_resets_it(monkeypatch):
    wm = tiny_model(perturb=0.05)
    actor = wm.acting_module(GradientMPCPlanner(wm, horizon=2, num_candidates=3))
    assert actor.planner.latent_key == "latent" and "latent" in actor.planner.in_keys
    assert {"observation", "is_init", "state", "belief", "previous_action"} <= set(actor.in_keys)
    # a short time limit: episodes of 6 steps, so a rollout crosses resets
    env = acting_env(wm).append_transform(StepCounter(max_steps=6, step_count_key="short_count"))
    td = env.rollout(14, actor, break_when_any_done=False)
    assert td["latent"].shape == (14, wm.latent_dim) and td["next", "state"].shape == (14, 16)
    starts = td["is_init"].squeeze(-1)
    assert starts.nonzero().squeeze(-1).tolist() == [0, 6, 12]
    for t in range(13):
        if starts[t + 1]:  # reset: the primer zeroes the carry
            for key in ("state", "belief", "previous_action"):
                assert (td[key][t + 1] == 0).all()
        else:  # the carry written into ("next", ...) is the next step's input
            assert torch.equal(td["state"][t + 1], td["next", "state"][t])
            assert torch.equal(td["belief"][t + 1], td["next", "belief"][t])
            assert torch.equal(td["previous_action"][t + 1], td["action"][t])
    # at an episode start the latent does not depend on the carry left in the tensordict
    step = td[6].exclude("next", "latent", "encoded_latents", "action")
    dirty = step.clone()
    dirty["state"], dirty["belief"] = torch.rand(16), torch.rand(32)
    torch.manual_seed(5)
    clean_latent = actor(step)["latent"]
    torch.manual_seed(5)
    torch.testing.assert_close(actor(dirty)["latent"], clean_latent)


@pytest.fixture
def median_draws(monkeypatch):
    """One fixed categorical draw (the median): the acting and training paths then sample the same classes."""
    import torchrl.modules.models.model_based as mb

    original = mb._straight_through_categorical

    def median_draw(logits, unimix=0.0, uniform=None):
        return original(logits, unimix, uniform=torch.full(logits.shape[:-1], 0.5))

    monkeypatch.setattr(mb, "_straight_through_categorical", median_draw)


@pytest.mark.usefixtures("median_draws")
def test_training_sequences_filter_like_the_acting_path():
    """The RSSM latents the losses train on are those the acting path computes on the same data."""
    wm = tiny_model(perturb=0.05)
    env = acting_env(wm)
    acted = env.rollout(9, wm.acting_module(PolicyActor(wm)))
    assert acted["is_init"][0].all()
    trained = wm.sequence_model()(acted.select("observation", "action", ("next", "observation")).unsqueeze(0))[0]
    # row t of a training sequence holds the latent of the observation after its action: the acting latent at t+1
    torch.testing.assert_close(trained["next", "state"][:-1], acted["next", "state"][1:])
    torch.testing.assert_close(trained["next", "belief"][:-1], acted["next", "belief"][1:])
    # ... and it starts where acting starts an episode
    start = wm.sequence_model()[1].module.filter_reset(acted["observation"][0])
    torch.testing.assert_close(start[0], acted["next", "state"][0])
    torch.testing.assert_close(start[1], acted["next", "belief"][0])


@pytest.mark.usefixtures("median_draws")
def test_training_sequences_restart_where_an_episode_begins():
    """A replayed sequence that crosses episode ends (DreamerV3's replay windows) restarts at every episode's first
    row as acting does; without the first-row flags it would carry the old episode's belief on."""
    wm = tiny_model(perturb=0.05)
    env = acting_env(wm).append_transform(StepCounter(max_steps=4, step_count_key="short_count"))
    acted = env.rollout(11, wm.acting_module(PolicyActor(wm)), break_when_any_done=False)
    starts = acted["is_init"].squeeze(-1)
    assert starts.nonzero().flatten().tolist() == [0, 4, 8]  # three episodes in one sequence
    rows = acted.select("observation", "action", ("next", "observation"), "is_init").unsqueeze(0)
    trained = wm.sequence_model(first_key="is_init")(rows.clone())[0]
    after = ~acted["next", "done"].squeeze(-1)[:-1]  # rows whose next observation the acting path filters at t+1
    torch.testing.assert_close(trained["next", "belief"][:-1][after], acted["next", "belief"][1:][after])
    torch.testing.assert_close(trained["next", "state"][:-1][after], acted["next", "state"][1:][after])
    carried_on = wm.sequence_model()(rows.clone())[0]
    assert not torch.allclose(carried_on["next", "belief"][4:], trained["next", "belief"][4:])
    torch.testing.assert_close(carried_on["next", "belief"][:4], trained["next", "belief"][:4])


@pytest.mark.usefixtures("median_draws")
def test_a_sequence_with_a_replay_context_continues_the_acting_belief():
    """DreamerV3's replay context: a window that starts inside an episode, from the posterior stored with its
    first row (the acting path's latent), filters exactly as acting did; from a reset it would not. Windows whose
    first row begins an episode, or has no stored posterior (NaN), start from the reset filter."""
    wm = tiny_model(perturb=0.05)
    acted = acting_env(wm).rollout(10, wm.acting_module(PolicyActor(wm)))
    assert not acted["is_init"][1:].any()
    keys = ("observation", "action", ("next", "observation"), "is_init", "latent")
    windows = torch.stack([acted.select(*keys)[4:10], acted.select(*keys)[0:6]])  # [2, 6]: mid-episode, its start
    model = wm.sequence_model(first_key="is_init", context_key="latent")
    trained = model(windows.clone())
    torch.testing.assert_close(trained["next", "belief"][0, :-1], acted["next", "belief"][5:10])
    torch.testing.assert_close(trained["next", "state"][0, :-1], acted["next", "state"][5:10])
    reset = wm.sequence_model(first_key="is_init")(windows.clone())
    assert not torch.allclose(reset["next", "belief"][0], trained["next", "belief"][0])
    assert torch.equal(reset["next", "belief"][1], trained["next", "belief"][1])  # an episode start: the reset filter
    missing = windows.clone()
    missing["latent"][0] = float("nan")
    assert torch.equal(model(missing)["next", "belief"], reset["next", "belief"])
    # what a stored posterior is: filtered latents are, the zeros of rows no policy acted on and NaN are not
    assert wm.is_posterior(acted["latent"]).all() and wm.is_posterior(wm.encode(acted["observation"])).all()
    assert not wm.is_posterior(torch.zeros(3, wm.latent_dim)).any()
    assert not wm.is_posterior(acted["latent"].masked_fill(torch.rand_like(acted["latent"]) < 0.1, float("nan"))).any()
    with pytest.raises(ValueError, match="needs first_key"):
        wm.sequence_model(context_key="latent")


def test_replay_context_stores_acting_latents_and_writes_training_posteriors_back():
    """Collected rows keep the acting latent (NaN where no policy acted); after an update, row t's next-observation
    posterior becomes the stored context of row t + 1, except where that row begins an episode."""
    from torchrl_dreammpc.trainers.dreamer_v3 import ReplayContext
    from torchrl_dreammpc.trainers.replay import make_replay_buffer

    wm = tiny_model(perturb=0.05)
    context = ReplayContext(wm)
    acted = acting_env(wm).rollout(6, wm.acting_module(PolicyActor(wm)))
    rows = acted.select("observation", "latent")
    rows["latent"][2] = 0.0  # a random seed step: the collector leaves the policy's outputs at zero
    marked = context.mark(rows.clone())
    assert marked["latent"][2].isnan().all() and torch.equal(marked["latent"][[0, 1, 3, 4, 5]],
                                                             acted["latent"][[0, 1, 3, 4, 5]])
    assert context.mark(acted.select("observation"))["latent"].isnan().all()  # an actor that writes none

    with pytest.raises(RuntimeError, match="no replay buffer to write to"):  # not registered: not silently skipped
        context.write_back(TensorDict({}, [2, 3]))
    buffer = make_replay_buffer(10, horizon=3, batch_size=1)
    buffer.extend(TensorDict({"latent": torch.full((10, wm.latent_dim), float("nan")),
                              "is_init": torch.zeros(10, 1, dtype=torch.bool)}, [10]))
    context.replay_buffer = buffer
    posterior = torch.randn(2, 3, wm.latent_dim)
    state, belief = wm.split(posterior)
    batch = TensorDict({"index": torch.tensor([[2, 3, 4], [6, 7, 8]]).unsqueeze(-1),
                        "is_init": torch.tensor([[False, False, False], [False, True, False]]).unsqueeze(-1),
                        "replay_context": {"state": state, "belief": belief}}, [2, 3])
    context.write_back(batch)
    stored = buffer.storage[:10]["latent"]
    written = {3: posterior[0, 0], 4: posterior[0, 1], 8: posterior[1, 1]}  # row 7 begins an episode: not written
    for row in range(10):
        if row in written:
            assert torch.equal(stored[row], written[row]), row
        else:
            assert stored[row].isnan().all(), row
    assert context.written == 3


def test_training_sequences_draw_as_torchrl_rssm_rollout():
    """Within one episode the rollout is TorchRL's RSSMRolloutV3 after the first observation's filter: the same
    latents and logits, draw for draw."""
    from tensordict.nn import TensorDictModule, TensorDictSequential
    from torchrl.modules import RSSMRolloutV3

    wm = tiny_model(perturb=0.05)
    rows = replay_batch(B=3, T=6)
    torch.manual_seed(11)
    ours = wm.sequence_model()(rows.clone())
    rollout = wm.sequence_model()[1].module
    prior = TensorDictModule(wm.prior, in_keys=["state", "belief", "action"],
                             out_keys=[("next", "prior_logits"), ("next", "state"), ("next", "belief")])
    posterior = TensorDictModule(wm.posterior, in_keys=[("next", "belief"), ("next", "encoded_latents")],
                                 out_keys=[("next", "posterior_logits"), ("next", "state")])
    torch.manual_seed(11)
    theirs = rows.clone()
    state, belief = rollout.filter_reset(theirs["observation"][:, 0])
    theirs["state"] = state.unsqueeze(1).expand(3, 6, -1)
    theirs["belief"] = belief.unsqueeze(1).expand(3, 6, -1)
    theirs = TensorDictSequential(
        TensorDictModule(wm.encoder, in_keys=[("next", "observation")], out_keys=[("next", "encoded_latents")]),
        RSSMRolloutV3(prior, posterior, reset_key=None))(theirs)
    for key in ("prior_logits", "posterior_logits", "state", "belief"):
        assert torch.equal(ours["next", key], theirs["next", key]), key


@pytest.mark.parametrize("name", ["dream_mpc", "mppi", "policy"])
def test_planners_act_through_it_in_a_batched_collector(name):
    wm = tiny_model(perturb=0.02)
    planner = {"dream_mpc": lambda: GradientMPCPlanner(wm, horizon=2), "mppi": lambda: MPPIPlanner(wm, **SMALL_MPPI),
               "policy": lambda: PolicyActor(wm)}[name]()
    env = acting_env(wm, num_envs=3).append_transform(StepCounter(max_steps=5, step_count_key="short_count"))
    collector = Collector(env, wm.acting_module(planner), frames_per_batch=24, total_frames=24)
    batch = next(iter(collector))
    collector.shutdown()
    assert batch.shape == (3, 8) and batch["action"].abs().max() <= 1
    assert torch.isfinite(batch["latent"]).all()
    starts = batch["is_init"].squeeze(-1)
    assert starts[:, 0].all() and starts[:, 5].all()  # episodes of 5 steps in every env
    assert (batch["belief"][starts] == 0).all() and (batch["belief"][:, 1:5] != 0).any()
    assert torch.equal(batch["previous_action"][:, 1:5], batch["action"][:, :4])
    # what DreamMPCTrainer reads to log planner diagnostics (planner.diagnostics=true) sees through the path
    assert wm.acting_module(planner).diagnostics is False
    if name != "policy":
        assert wm.acting_module(type(planner)(wm, diagnostics=True)).diagnostics is True


@pytest.mark.parametrize("name", ["dream_mpc", "mppi", "policy"])
def test_batched_planning_equals_single_env_planning(name):
    wm = tiny_model(perturb=0.02)
    make = {"dream_mpc": lambda g: GradientMPCPlanner(wm, generator=g, exploration_std=0.1),
            "mppi": lambda g: MPPIPlanner(wm, generator=g, **SMALL_MPPI),
            "policy": lambda g: PolicyActor(wm, generator=g)}[name]
    latents = wm.encode(torch.randn(3, 5)).detach()
    steps = [TensorDict({"latent": latents + 0.01 * k, "is_init": torch.full((3, 1), k == 0)}, [3]) for k in range(3)]
    batched = make(torch.Generator().manual_seed(7))
    single = [make(torch.Generator().manual_seed(7)) for _ in range(3)]
    generator = torch.Generator().manual_seed(7)
    for planner in single:  # the b-th single-env planner draws what env b of the batch draws
        planner.generator = generator
    for step in steps:
        out = batched(step.clone())["action"]
        for b in range(3):
            torch.testing.assert_close(out[b], single[b](step[b].clone())["action"], rtol=1e-5, atol=1e-5)


def test_planner_needs_the_latent_and_checks_it():
    wm = tiny_model()
    planner = GradientMPCPlanner(wm)
    with pytest.raises(KeyError, match="acting_module"):
        planner(TensorDict({"observation": torch.randn(5)}))
    with pytest.raises(ValueError, match="latent has width 48"):
        planner(TensorDict({"latent": torch.randn(2, 47)}, [2]))
    with pytest.raises(ValueError, match="latent_key"):
        wm.acting_module(GradientMPCPlanner(wm, latent_key="other"))
    # a TD-MPC2 model keeps encoding the observation
    tdmpc2 = TDMPC2WorldModel(5, 1, model_size=1, enc_dim=16, mlp_dim=16, latent_dim=16)
    assert PolicyActor(tdmpc2).in_keys[0] == "observation" and tdmpc2.acting_module(p := PolicyActor(tdmpc2)) is p


def test_env_transforms_are_added_once():
    wm = tiny_model()
    create = with_transforms(functools.partial(make_env, TASK), wm.acting_transforms())
    twice = with_transforms(create, wm.acting_transforms())
    assert sum(type(t).__name__ == "TensorDictPrimer" for t in twice().transform) == 1
    assert with_transforms(create, []) is create


# ---------------------------------------------------------------------------------------------------------------
# TorchRL's losses and stepper
# ---------------------------------------------------------------------------------------------------------------
def test_loss_uses_the_reference_settings_and_one_discount():
    wm = tiny_model()
    loss = DreamerV3TrainingLoss(wm)
    assert (loss.model_loss.kl_mode, loss.model_loss.unimix, loss.model_loss.free_bits) == ("separate", 0.01, 1.0)
    assert (loss.model_loss.lambda_dynamic, loss.model_loss.lambda_representation) == (1.0, 0.1)
    assert loss.model_loss.lambda_continue == 1.0 and loss.replay_value_loss_weight == 0.3
    assert float(loss.actor_loss.value_estimator.gamma) == pytest.approx(wm.discount)
    assert loss.continuation_horizon == pytest.approx(333.0)
    assert len(loss.value_loss.members) == 2
    assert all(member._resolved_gamma() == pytest.approx(wm.discount) for member in loss.value_loss.members)
    # every learned weight is the model's, registered once; checkpoints find them under "world_model."
    model_params = {id(p) for p in wm.parameters()}
    assert {id(p) for p in loss.parameters()} == model_params
    assert sum(key.startswith("world_model.") for key in loss.state_dict()) == len(wm.state_dict())


def test_a_checkpoint_of_the_earlier_sequence_model_layout_loads():
    """The losses register the model's weights again under their views' names; a trainer checkpoint written before
    the sequence model's layout changed (tests/data: its names, as commit 5d5da4e wrote them) loads, its views
    filled from its world_model entries."""
    layout = json.loads((ROOT / "tests" / "data" / "dreamer_v3_loss_layout_5d5da4e.json").read_text())["aliases"]
    source = DreamerV3TrainingLoss(tiny_model(seed=1, perturb=0.05))
    saved = {key: value for key, value in source.state_dict().items() if not key.startswith("model_loss.world_model.")}
    saved.update({key: saved["world_model." + name].clone() for key, name in layout.items()})
    assert not set(layout) & set(source.state_dict())  # the layouts differ
    target = DreamerV3TrainingLoss(tiny_model(seed=2))
    target.load_state_dict(saved)  # strict
    for (name, mine), theirs in zip(target.state_dict().items(), source.state_dict().values()):
        assert torch.equal(mine, theirs), name
    with pytest.raises(RuntimeError, match="Missing key"):  # a checkpoint that lacks a weight still fails
        target.load_state_dict({k: v for k, v in saved.items() if k != "world_model.reward_head.model.0.weight"})


def test_losses_decrease_on_a_fixed_batch():
    wm = tiny_model()
    loss, stepper = make_dreamer_v3_update(wm, lr=3e-3, warmup_steps=0, imagination_horizon=4)
    batch = replay_batch()
    torch.manual_seed(0)
    history = [stepper.step(None, batch.clone()) for _ in range(40)]
    first, last = history[0], history[-1]
    for key in ("loss_model_reco", "loss_model_reward", "loss_model_continue"):
        assert last[key] < 0.7 * first[key], (key, first[key].item(), last[key].item())
    assert all(torch.isfinite(value).all() for out in history for value in out.values())


def test_critic_ensemble_each_member_learns_the_lambda_returns():
    wm = tiny_model(num_critics=3)
    critic_loss = DreamerV3CriticEnsembleLoss(wm.critic_modules(), wm.critic_mean_module())
    optimizer = torch.optim.Adam(critic_loss.parameters(), lr=3e-3)
    torch.manual_seed(0)
    fake = TensorDict({"state": torch.rand(32, 5, 16), "belief": torch.randn(32, 5, 32),
                       "lambda_target": torch.randn(32, 5, 1) * 3}, [32, 5])
    losses = []
    for _ in range(60):
        out, _ = critic_loss(fake)
        optimizer.zero_grad()
        out["loss_value"].backward()
        # every critic is trained (its zero-initialized output layer first, the layers below once it is not zero)
        assert all(critic.model[-1].weight.grad.abs().sum() > 0 for critic in wm.critics)
        optimizer.step()
        losses.append([m(fake)[0]["loss_value"].item() for m in critic_loss.members])
    assert all(end < 0.8 * start for start, end in zip(losses[0], losses[-1]))
    assert all(p.grad.abs().sum() > 0 for critic in wm.critics for p in critic.parameters())
    z = torch.cat([fake["state"], fake["belief"]], -1)
    assert wm.state_values(z).std(0).mean() > 0  # the members differ


def test_replay_critic_ensemble_passes_one_critic_s_gradient_to_the_features():
    """With K identical critics, the replay features get the gradient one DreamerV3 critic gives them (not K
    times it), and each critic gets the full gradient of its own replay loss."""
    torch.manual_seed(0)
    wm = tiny_model(perturb=0.1)
    critic_loss = DreamerV3CriticEnsembleLoss(wm.critic_modules(), wm.critic_mean_module())
    with torch.no_grad():  # every critic and its slow copy equal to the first
        for member in wm.critics[1:]:
            for mine, first in zip(member.parameters(), wm.critics[0].parameters()):
                mine.copy_(first)
        first = critic_loss.members[0].target_value_model_params
        for member in critic_loss.members[1:]:
            for key, slow in member.target_value_model_params.items(True, True):
                slow.copy_(first.get(key))
    B, T = 4, 6
    features = {"state": torch.rand(B, T, 16, requires_grad=True), "belief": torch.randn(B, T, 32, requires_grad=True)}
    replay = TensorDict({**features, "bootstrap": torch.randn(B, T),
                         "next": {"reward": torch.randn(B, T, 1), "done": torch.zeros(B, T, 1, dtype=torch.bool),
                                  "terminated": torch.zeros(B, T, 1, dtype=torch.bool)}}, [B, T])

    def gradients(loss_fn):
        for tensor in [*features.values(), *critic_loss.parameters()]:
            tensor.grad = None
        loss_fn(replay)["loss_replay_value"].backward()
        return ([features[k].grad.clone() for k in features],
                [p.grad.clone() for p in wm.critics[0].parameters()])

    ensemble_features, ensemble_critic = gradients(critic_loss.replay_value_loss)
    one_features, one_critic = gradients(critic_loss.members[0].replay_value_loss)
    assert all(g.abs().sum() > 0 for g in one_features)
    for ensemble, one in zip(ensemble_features + ensemble_critic, one_features + one_critic):
        torch.testing.assert_close(ensemble, one)


def test_a_non_finite_update_stops_before_the_optimizer_step():
    from torchrl_dreammpc.trainers.stepper import NonFiniteUpdateError

    wm = tiny_model()
    _, stepper = make_dreamer_v3_update(wm, warmup_steps=0, imagination_horizon=4)
    batch = replay_batch()
    stepper.step(None, batch.clone())  # one finite update
    before = {name: p.detach().clone() for name, p in wm.named_parameters()}
    slow_before = [u.target_value_model_params.clone() for u in stepper.loss_module.value_loss.members]
    batch["next", "reward"][1, 2] = float("nan")
    with pytest.raises(NonFiniteUpdateError, match=r"Non-finite DreamerV3 loss \(update 2\): loss_model_reward = nan"):
        stepper.step(None, batch)
    assert all(torch.equal(p, before[name]) for name, p in wm.named_parameters())  # no step taken
    assert all((slow == member.target_value_model_params).all()
               for slow, member in zip(slow_before, stepper.loss_module.value_loss.members))
    assert all(p.grad is None for p in wm.parameters())


def test_torchrl_stepper_is_one_dreamer_update():
    """DreamerV3OptimizationStepper.step == sum the loss_* entries, backward, one DreamerV3Optimizer step over every
    weight, then the slow critics' EMA (DreamerV3's update order)."""
    batch = replay_batch(B=2, T=6)
    wm_a, wm_b = tiny_model(seed=3), tiny_model(seed=3)
    loss_a, stepper = make_dreamer_v3_update(wm_a, warmup_steps=0, imagination_horizon=3)
    loss_b, _ = make_dreamer_v3_update(wm_b, warmup_steps=0, imagination_horizon=3)
    optimizer = DreamerV3Optimizer(loss_b.parameters(), warmup_steps=0)
    with torch.no_grad():  # slow critics away from the critics: the EMA's shift (2 % of the gap) is then visible
        for loss in (loss_a, loss_b):
            for member in loss.value_loss.members:
                for key, slow in member.target_value_model_params.items(True, True):
                    if "bins" not in str(key):  # (the two-hot bins are constants, not weights)
                        slow.add_(0.1)

    def slow_weights(loss):
        return [t for m in loss.value_loss.members for k, t in m.target_value_model_params.items(True, True)
                if "bins" not in str(k)]

    slow_before = [t.clone() for t in slow_weights(loss_a)]
    for step in range(2):
        torch.manual_seed(step)
        stepper.step(None, batch.clone())
        torch.manual_seed(step)
        out = loss_b(batch.clone())
        optimizer.zero_grad(set_to_none=False)
        sum(value for key, value in out.items() if key.startswith("loss_")).backward()
        optimizer.step()
        with torch.no_grad():
            for member in loss_b.value_loss.members:
                member.target_value_model_params.lerp_(member.value_model_params.data, 0.02)
    for (name, a), b in zip(loss_a.state_dict().items(), loss_b.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(slow_weights(loss_a), slow_before))  # the EMA moved them


def test_resume_keeps_this_run_s_optimizer_settings_and_the_checkpoint_s_progress():
    """TorchRL's stepper would restore the checkpoint's lr / agc / warm-up with the moments; ours keeps the
    configured ones, and the optimizer's progress (its per-group ``step``, which drives the warm-up) is restored."""
    batch = replay_batch(B=2, T=6)
    _, stepper = make_dreamer_v3_update(tiny_model(seed=3), imagination_horizon=3)
    for _ in range(2):
        stepper.step(None, batch.clone())
    state = stepper.state_dict()
    _, resumed = make_dreamer_v3_update(tiny_model(seed=3), lr=1e-5, agc=0.1, imagination_horizon=3)
    with pytest.warns(UserWarning, match=r"DreamerV3 optimizer group 0 lr 4e-05 -> 1e-05, DreamerV3 optimizer "
                                         r"group 0 agc 0.3 -> 0.1$"):
        resumed.load_state_dict(state)
    group = resumed.optimizer.param_groups[0]
    assert (group["lr"], group["agc"], group["warmup_steps"], group["step"]) == (1e-5, 0.1, 1000, 2)
    first = next(iter(resumed.optimizer.state_dict()["state"].values()))
    torch.testing.assert_close(first["momentum"], next(iter(state["optimizer"]["state"].values()))["momentum"])


def test_update_schedule_matches_dreamer_update_ratio():
    """The trainer's schedule gives DreamerV3UpdateRatio's update counts (which adds one update on its first call)."""
    ours, theirs = _UpdateSchedule(0.25), DreamerV3UpdateRatio(0.25)
    total_ours = total_theirs = frames = 0
    for chunk in [1] * 37 + [3] * 11 + [5] * 7:
        frames += chunk
        total_ours += ours(chunk)
        total_theirs += theirs(frames)
        assert total_theirs - 1 <= total_ours <= total_theirs  # DreamerV3UpdateRatio adds one update at call 1


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------
def test_world_model_file_round_trip_and_family(tmp_path):
    wm = tiny_model(perturb=0.01, num_critics=3)
    path = save_world_model(wm, tmp_path / "wm.pt")
    assert torch.load(path, weights_only=True)["family"] == "dreamer_v3"
    for loaded in (load_world_model(path, obs_dim=5, action_dim=1), load_any(str(path), 5, 1)):
        assert isinstance(loaded, DreamerV3WorldModel) and not loaded.training
        for a, b in zip(wm.state_dict().values(), loaded.state_dict().values()):
            assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="num_critics: checkpoint 3, expected 2"):
        load_world_model(path, expect_config={"num_critics": 2})
    with pytest.raises(CheckpointError, match="observation width 5"):
        load_world_model(path, obs_dim=6)
    # TD-MPC2 files keep their layout (no family entry); an unknown family is refused
    tdmpc2 = save_world_model(TDMPC2WorldModel(5, 1, model_size=1, enc_dim=16, mlp_dim=16, latent_dim=16),
                              tmp_path / "t.pt")
    assert "family" not in torch.load(tdmpc2, weights_only=True)
    payload = torch.load(path, weights_only=True)
    payload["family"] = "dreamer_v9"
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="family 'dreamer_v9'"):
        load_world_model(tmp_path / "bad.pt")


# ---------------------------------------------------------------------------------------------------------------
# training, kill, resume, evaluation (recipes)
# ---------------------------------------------------------------------------------------------------------------
TRAIN_ARGS = ["preset=dreamer_cpu", "dreamer.model.deter=32", "dreamer.model.hidden=16", "dreamer.model.stoch=4",
              "dreamer.model.units=16", "dreamer.model.blocks=4", "dreamer.batch_size=4", "dreamer.batch_length=8",
              "dreamer.seed_steps=100", "dreamer.train_ratio=8", "dreamer.loss.imagination_horizon=4",
              "planner=policy", "eval_episodes=1", "checkpoint_interval=100", "log_interval=100",
              "eval_at_start=false", "threads=1"]


def _run(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "recipes" / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_train_kill_resume_and_evaluate_a_dreamer_run(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TRAIN_ARGS, "steps=400", "eval_interval=200", f"run_dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "recipes" / "train.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        marker = run_dir / "checkpoints" / "checkpoint-000000000200" / "manifest.json"
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, f"train.py exited early: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint at step 200 within 300 s"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    complete = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*") if (p / "manifest.json").exists())
    manifest = json.loads((run_dir / "checkpoints" / complete[-1] / "manifest.json").read_text())
    fingerprint = manifest["metadata"]["fingerprint"]
    assert (fingerprint["algorithm"], fingerprint["model_size"], fingerprint["horizon"]) == ("dreamer_v3", "cpu", 8)

    resumed = _run("train.py", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / complete[-1]}" in resumed.stdout
    assert "dreamer_v3, planner policy, model_size cpu" in resumed.stdout
    assert [step for step, _ in read_eval_csv(run_dir / "eval.csv")] == [200, 400]  # each evaluation once
    wm, fingerprint = load_world_model_from_trainer_checkpoint(run_dir)
    assert isinstance(wm, DreamerV3WorldModel) and wm.config.deter == 32

    # planners swapped on the trainer checkpoint, and on the world-model file of the run's end
    out = tmp_path / "eval"
    evaluated = _run("evaluate.py", f"checkpoint={run_dir}", "planners=[policy,mppi,dream_mpc]", "episodes=1",
                     "max_steps=40", "threads=1", f"output_dir={out}", "+planner_args.mppi.num_samples=32",
                     "+planner_args.mppi.num_elites=4", "+planner_args.mppi.iterations=1",
                     "+planner_args.mppi.num_pi_trajs=4")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert "checkpoint-000000000400" in results["source"]
    assert [row["planner"] for row in results["results"]] == ["policy", "mppi", "dream_mpc"]
    assert all(row["episodes"] == 1 and row["plan_ms_per_step"] > 0 for row in results["results"])
    from_file = _run("evaluate.py", f"checkpoint={run_dir / 'world_model.pt'}", f"task={TASK}", "planners=[policy]",
                     "episodes=1", "max_steps=40", "threads=1", f"output_dir={tmp_path / 'eval2'}")
    assert from_file.returncode == 0, from_file.stderr[-3000:]


def _short_episodes(max_steps: int = 5):
    """cartpole whose episodes end (truncated) after ``max_steps`` steps."""
    return make_env(TASK, seed=1).append_transform(StepCounter(max_steps=max_steps, step_count_key="short_count"))


def _short_episode_trainer(tmp_path, across: bool = True, context: bool = False, online: bool = False, **kw):
    """A DreamerV3 trainer on 5-step episodes (40 seed steps, 60 in all) replaying sequences of 8."""
    from torchrl_dreammpc.trainers import DreamMPCTrainer

    wm = tiny_model()
    return DreamMPCTrainer(
        world_model=wm, actor=wm.acting_module(PolicyActor(wm)), algorithm="dreamer_v3",
        create_env_fn=_short_episodes, total_frames=60, seed_frames=40, batch_size=4, horizon=8, utd_ratio=0.5,
        algorithm_kwargs={"replay_across_episodes": across, "replay_context": context, "replay_online": online},
        eval_interval=0, eval_at_start=False, verbose=False,
        **{"loss_kwargs": dict(imagination_horizon=2), "log_dir": tmp_path / "run",
           "checkpoint_dir": tmp_path / "run" / "checkpoints", "checkpoint_interval": 60, **kw})


def test_a_dreamer_run_replays_sequences_across_episode_ends(tmp_path):
    """Episodes of 5 steps, sequences of 8: only a replay across episode ends has sequences to give. The trainer
    stores where episodes begin, samples windows that cross them, and trains on them; a resume keeps the setting."""
    from torchrl_dreammpc.trainers import ConfigMismatchError
    from torchrl_dreammpc.trainers.replay import STREAM_KEY

    def trainer(across: bool, **kw):
        return _short_episode_trainer(tmp_path, across, **kw)

    run = trainer(True)
    assert run.fingerprint["replay_across_episodes"] is True
    assert run.loss_module.first_key == "is_init"
    run.train()
    sample = run.replay_hook.sample()
    assert sample.shape == (4, 8) and (sample.get(STREAM_KEY) == 0).all()
    starts = sample["is_init"].squeeze(-1)
    assert starts[:, 1:].any(), "8-step windows over 5-step episodes cross an episode end"
    # every window is consecutive steps of the one env: an episode start follows a done row, and only then
    done = sample["next", "done"].squeeze(-1)
    torch.testing.assert_close(starts[:, 1:], done[:, :-1])
    assert all(torch.isfinite(p).all() for p in run.loss_module.parameters())
    losses = run.loss_module(sample)
    assert torch.isfinite(torch.stack([v for k, v in losses.items() if k.startswith("loss_")])).all()
    with pytest.raises(ConfigMismatchError, match="replay_across_episodes: checkpoint has True, this run has False"):
        trainer(False).resume()
    assert trainer(True).resume() is not None
    with pytest.raises(ValueError, match="needs num_workers=1 and replay_whole_episodes=False"):
        trainer(True, replay_whole_episodes=True, log_dir=None, checkpoint_dir=None)


def test_a_dreamer_run_with_dreamer_v3_s_replay(tmp_path):
    """DreamerV3's replay in a run, windows across episode ends with its replay context and online queue: the
    acting latents are stored with the rows (none for the seed phase's random steps), the updates write their
    posteriors back (episode starts excepted: never read), every 8 rows written form a window that the updates
    consume, the contexts and the queue are checkpointed with the buffer, and a resume keeps the settings."""
    from torchrl_dreammpc.trainers import ConfigMismatchError
    from torchrl_dreammpc.trainers.replay import OnlineStreamSampler

    run = _short_episode_trainer(tmp_path, context=True, online=True)
    assert run.fingerprint["replay_context"] is True and run.loss_module.context_key == "latent"
    assert run.fingerprint["replay_online"] is True and isinstance(run.replay_buffer.sampler, OnlineStreamSampler)
    run.train()
    # 60 rows: 7 windows of 8, all replayed by the updates (4 windows each), and 4 rows waiting for the next
    assert not run.replay_buffer.sampler._queued_slices
    assert run.replay_buffer.sampler._pending_indices.tolist() == [56, 57, 58, 59]
    hook = run.algorithm_hooks[0]
    stored = run.replay_buffer.storage[:60]
    has = torch.isfinite(stored["latent"]).all(-1)
    starts = stored["is_init"].squeeze(-1)
    assert has[40:].all() and run.world_model.is_posterior(stored["latent"][40:]).all()  # acted rows
    assert not has[:40][starts[:40]].any()  # seed-phase episode starts: none stored, none written
    assert has[:40][~starts[:40]].sum() >= 20 and hook.written > 0  # written back by the updates
    losses = run.loss_module(run.replay_hook.sample())
    assert torch.isfinite(torch.stack([v for k, v in losses.items() if k.startswith("loss_")])).all()

    with pytest.raises(ConfigMismatchError, match="replay_context: checkpoint has True, this run has False"):
        _short_episode_trainer(tmp_path, online=True).resume()
    with pytest.raises(ConfigMismatchError, match="replay_online: checkpoint has True, this run has False"):
        _short_episode_trainer(tmp_path, context=True).resume()
    resumed = _short_episode_trainer(tmp_path, context=True, online=True)
    assert resumed.resume() is not None
    assert torch.equal(resumed.replay_buffer.storage[:60]["latent"].nan_to_num(7.0), stored["latent"].nan_to_num(7.0))
    assert resumed.replay_buffer.sampler._pending_indices.tolist() == [56, 57, 58, 59]
    for option in ("context", "online"):
        with pytest.raises(ValueError, match=f"replay_{option}=True needs replay_across_episodes=True"):
            _short_episode_trainer(tmp_path, across=False, **{option: True}, log_dir=None, checkpoint_dir=None)
    with pytest.raises(ValueError, match=r"loss_kwargs \['context_key'\] are set by replay_across_episodes"):
        _short_episode_trainer(tmp_path, loss_kwargs=dict(context_key="latent"), log_dir=None, checkpoint_dir=None)


def test_recipe_validation_names_dreamer_keys():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from torchrl_dreammpc.trainers.builders import ConfigError, update_arguments, validate_train_config

    def config(*overrides):
        with initialize_config_dir(config_dir=str(ROOT / "recipes" / "config"), version_base="1.3"):
            return OmegaConf.to_container(compose(config_name="train", overrides=list(overrides)), resolve=True)

    published = config("algorithm=dreamer_v3", "steps=100000")
    checked = validate_train_config(published)
    update = update_arguments(published, checked)
    assert (update["batch_size"], update["horizon"], update["utd_ratio"], update["lr"]) == (16, 64, 1.0, 4e-5)
    assert checked["seed_steps"] == 16 * 64 and update["pretrain_updates"] == 0
    assert update["loss_kwargs"]["agc"] == 0.3 and update["loss_kwargs"]["imagination_horizon"] == 15
    cpu = config("preset=dreamer_cpu", "steps=100000")
    assert cpu["algorithm"] == "dreamer_v3" and update_arguments(cpu, validate_train_config(cpu))["utd_ratio"] == 0.25
    for override, message in [("dreamer.model_size=2m", "dreamer.model_size"),
                              ("dreamer.batch_length=0", "dreamer.batch_length"),
                              ("dreamer.horizon=1", "dreamer.horizon"),
                              ("dreamer.model.deter=30", "divisible by blocks"),
                              ("compile=true", "compile=true"),
                              ("+dreamer.loss.imagination_length=3", "imagination_length"),
                              ("+dreamer.optimizer.momentum=0.5", "dreamer.optimizer"),
                              ("dreamer.batch_length=501", r"dreamer.batch_length=501 is longer than an episode "
                                                           r"of cartpole-swingup \(500 steps\)"),
                              ("task=humanoid_h1hand-stand-v0", "humanoid_h1hand-stand-v0: its episodes can end "
                                                               "early .* would never be replayed. Set "
                                                               "dreamer.replay_across_episodes=true"),
                              ("dreamer.replay_across_episodes=1", "must be true or false, got 1")]:
        with pytest.raises(ConfigError, match=message):
            validate_train_config(config("preset=dreamer_cpu", "steps=100000", override))
    # across episode ends: early-ending tasks and sequences longer than an episode train; one env stream only
    across = config("preset=dreamer_cpu", "steps=100000", "task=humanoid_h1hand-stand-v0",
                    "dreamer.replay_across_episodes=true")
    assert update_arguments(across, validate_train_config(across))["algorithm_kwargs"] == {
        "replay_across_episodes": True, "replay_context": False, "replay_online": False}
    assert update_arguments(cpu, validate_train_config(cpu))["algorithm_kwargs"] == {
        "replay_across_episodes": False, "replay_context": False, "replay_online": False}
    dreamer_replay = config("preset=dreamer_cpu", "steps=100000", "task=humanoid_h1hand-stand-v0",
                            "dreamer.replay_across_episodes=true", "dreamer.replay_context=true",
                            "dreamer.replay_online=true")
    assert update_arguments(dreamer_replay, validate_train_config(dreamer_replay))["algorithm_kwargs"] == {
        "replay_across_episodes": True, "replay_context": True, "replay_online": True}
    for option in ("replay_context", "replay_online"):
        for override, message in [(f"dreamer.{option}=true", f"dreamer.{option}=true needs "
                                                             "dreamer.replay_across_episodes=true"),
                                  (f"dreamer.{option}=1", f"dreamer.{option} must be true or false")]:
            with pytest.raises(ConfigError, match=message):
                validate_train_config(config("preset=dreamer_cpu", "steps=100000", override))
    for key in ("first_key", "context_key"):  # what the replay stores follows the switches
        with pytest.raises(ConfigError, match=f"dreamer.loss.{key} is set by the replay switches"):
            validate_train_config(config("preset=dreamer_cpu", "steps=100000", "dreamer.replay_across_episodes=true",
                                         f"+dreamer.loss.{key}=latent"))
    validate_train_config(config("preset=dreamer_cpu", "steps=100000", "dreamer.batch_length=501",
                                 "dreamer.replay_across_episodes=true"))
    for override in ("collector.num_workers=2", "collector.backend=ray"):
        with pytest.raises(ConfigError, match="needs collector.num_workers=1 .* collector.backend=local"):
            validate_train_config(config("preset=dreamer_cpu", "steps=100000", "dreamer.replay_across_episodes=true",
                                         override))
    with pytest.raises(ConfigError, match="cannot hold one sub-trajectory of dreamer.batch_length=32"):
        validate_train_config(config("preset=dreamer_cpu", "steps=100000", "buffer_size=20"))


def test_td_mpc2_settings_are_refused_with_dreamer_naming_its_own():
    """lr, model_size, ... would be silently ignored by algorithm=dreamer_v3: train.py refuses them (set on the
    command line or by a preset), naming DreamerV3's counterpart; they stay fine for the TD-MPC2 family."""
    from torchrl_dreammpc.trainers.builders import ConfigError, check_keys_apply

    spec = importlib.util.spec_from_file_location("train_recipe", ROOT / "recipes" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    where = train.keys_set(["preset=quickstart", "lr=1e-4", "+model.mlp_dim=64", "dreamer.optimizer.lr=1e-5"])
    assert where["lr"] == where["model.mlp_dim"] == "the command line"
    assert where["model_size"] == where["batch_size"] == "preset=quickstart"  # (model_size: a group override)
    with pytest.raises(ConfigError) as err:
        check_keys_apply("dreamer_v3", where)
    message = str(err.value)
    for part in ["lr (set by the command line): use dreamer.optimizer.lr",
                 "model.mlp_dim (set by the command line): use dreamer.model.*",
                 "model_size (set by preset=quickstart): use dreamer.model_size",
                 "pretrain_updates (set by preset=quickstart): use dreamer.pretrain_updates"]:
        assert part in message, message
    assert "dreamer.optimizer.lr (" not in message
    check_keys_apply("tdmpc2", where), check_keys_apply("bmpc", where)
    check_keys_apply("dreamer_v3", train.keys_set([*TRAIN_ARGS, "steps=400", "buffer_size=1000"]))
    cli = _run("train.py", "algorithm=dreamer_v3", "model_size=1", "steps=400", "run_dir=/nonexistent/run")
    assert cli.returncode == 1 and "model_size (set by the command line): use dreamer.model_size" in cli.stderr
    assert cli.stderr.startswith("train.py: invalid config: algorithm=dreamer_v3 does not read")


def test_trainer_refuses_a_model_of_another_algorithm(tmp_path):
    from torchrl_dreammpc.trainers import DreamMPCTrainer

    wm = tiny_model()
    common = dict(create_env_fn=functools.partial(make_env, TASK, seed=1), total_frames=100, seed_frames=50,
                  eval_interval=0, eval_at_start=False, verbose=False)
    with pytest.raises(TypeError, match="algorithm='dreamer_v3'"):
        DreamMPCTrainer(world_model=wm, actor=wm.acting_module(PolicyActor(wm)), algorithm="tdmpc2", **common)
    tdmpc2 = TDMPC2WorldModel(5, 1, model_size=1, enc_dim=16, mlp_dim=16, latent_dim=16)
    with pytest.raises(TypeError, match="algorithm='dreamer_v3' trains a world model of family 'dreamer_v3'"):
        DreamMPCTrainer(world_model=tdmpc2, actor=PolicyActor(tdmpc2), algorithm="dreamer_v3", **common)
