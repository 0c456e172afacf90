"""Equivalence with BMPC's public code (github.com/wertyuilife2/bmpc@d5dabc6) on fixed weights and a fixed batch.

``tests/data/bmpc_reference.pt`` was written by ``tests/data/bmpc_reference.py`` from the peer's code (see its
docstring for what was run and how its randomness was pinned). Every comparison is to 1e-5. When the peer's
archive is present (``../shared/peers``), the reference is also regenerated and compared with the committed file.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_dreammpc.checkpoints import load_any
from torchrl_dreammpc.modules import BMPCWorldModel
from torchrl_dreammpc.objectives import BMPCLoss, BMPCPolicyLoss
from torchrl_dreammpc.planners import MPPIPlanner
from torchrl_dreammpc.trainers import LazyReanalyze

DATA = Path(__file__).resolve().parent / "data"
REFERENCE = DATA / "bmpc_reference.pt"
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE, weights_only=True)


@pytest.fixture
def model(reference):
    """The peer's weights read through our checkpoint loader (its V ensemble makes it a BMPCWorldModel); eval mode,
    which equals the peer's train mode here since its V dropout is 0."""
    wm = load_any(reference["state_dict"], reference["config"]["obs_dim"], reference["config"]["action_dim"],
                  discount=reference["config"]["discount"])
    assert isinstance(wm, BMPCWorldModel)
    return wm.eval()


def close(ours, theirs, atol=ATOL):
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=atol, rtol=0)


def test_world_model_outputs(model, reference):
    inputs, out = reference["model"]["inputs"], reference["model"]["outputs"]
    obs, action, eps = inputs["observation"], inputs["action"], inputs["eps"]
    z = model.encode(obs)
    close(z, out["latent"])
    close(model.next(z, action), out["next_latent"])
    close(model.reward_logits(z, action), out["reward_logits"])
    close(model.reward(z, action), out["reward"])
    close(model.v_logits(z), out["v_logits"])
    close(model.state_value(z, reduce="all"), out["v"])
    close(model.v_logits(z, target=True), out["target_v_logits"])
    close(model.state_value(z), out["v_avg"])  # two heads: the "avg" of the random pair is their mean
    close(model.state_value(z, target=True), out["target_v_avg"])
    mean, log_std = model.policy_params(z)
    close(mean, out["pi_mean"])
    close(log_std, out["pi_log_std"])
    close(model.policy(z, eps=eps)[0], out["pi_action"])
    with model.exploration_prior():
        close(model.policy_params(z)[1], out["pi_expl_log_std"])
    # the planning ops (what the planners call) compute the same
    ops = model.planning_ops()
    close(ops.encode(obs), out["latent"])
    close(ops.state_value(z, reduce="all"), out["v"])
    close(ops.policy(z, eps=eps)[0], out["pi_action"])


def _batch(update) -> TensorDict:
    """The peer's time-major [H+1, B] batch as our [B, H] sub-trajectories."""
    inputs = update["inputs"]
    obs, action, reward = inputs["obs"], inputs["action"], inputs["reward"]
    B, H = action.shape[1], action.shape[0]
    return TensorDict({
        "observation": obs[:-1].transpose(0, 1), "action": action.transpose(0, 1),
        "expert": {"loc": inputs["expert_loc"].transpose(0, 1), "scale": inputs["expert_scale"].transpose(0, 1)},
        # BMPC has no termination model; the loss still requires the flags every replayed batch carries
        "next": {"observation": obs[1:].transpose(0, 1), "reward": reward.transpose(0, 1),
                 "terminated": torch.zeros(B, H, 1, dtype=torch.bool)},
    }, [B, H])


def test_value_targets_and_world_model_losses(model, reference):
    update, seed = reference["update"], reference["seeds"]["target"]
    obs = update["inputs"]["obs"]
    with torch.no_grad():
        torch.manual_seed(seed)  # the policy's sample a ~ π(z) draws the same numbers as the peer's
        z = model.encode(obs[:-1])
        target = model.value(z, model.policy(z)[0], reduce="avg", target=True)
    close(target, update["td_target"])
    torch.manual_seed(seed)
    out = BMPCLoss(model)(_batch(update))
    close(out["consistency"], update["consistency_loss"])
    close(out["reward_ce"], update["reward_loss"])
    close(out["value_ce"], update["value_loss"])
    total = out["loss_consistency"] + out["loss_reward"] + out["loss_value"]
    close(total, update["total_loss"])
    close(out["latents"], update["latents"])
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), float("inf"))
    close(grad_norm, update["grad_norm"])


def test_policy_kl_loss_and_its_scale(model, reference):
    update = reference["update"]
    loss = BMPCPolicyLoss(model)
    torch.manual_seed(reference["seeds"]["pi"])  # the entropy's reparameterized sample, as the peer's
    out = loss(TensorDict({"latents": update["latents"], "expert_loc": update["inputs"]["expert_loc"],
                           "expert_scale": update["inputs"]["expert_scale"]}, []))
    close(out["loss_pi"], update["pi_loss"])
    close(loss.scale.value.squeeze(), update["pi_scale"].squeeze())
    assert update["pi_scale"].item() > 1.0  # the scale moved off its floor: the comparison is not trivial
    close(out["pi_scaled_entropy"], update["pi_scaled_entropy"].mean())
    out["loss_pi"].backward()
    close(torch.nn.utils.clip_grad_norm_(model.policy_parameters(), float("inf")), update["pi_grad_norm"])


def test_one_reanalyze_expert_distribution(model, reference):
    ref = reference["reanalyze"]
    planner = MPPIPlanner(model, expert_key="expert", **ref["planner"])
    planner.draw_noise = lambda batch, device, dtype: ref["noise"]  # the numbers the peer consumed
    with model.exploration_prior(), set_exploration_type(ExplorationType.RANDOM):
        out = planner(TensorDict({"observation": ref["observation"]}, [ref["observation"].shape[0]]))
    close(out["expert", "loc"], ref["expert_loc"])
    close(out["expert", "scale"], ref["expert_scale"])
    # the same through the reanalyze hook (one call for all the states, the layout of the noise above)
    hook = LazyReanalyze(planner, interval=1, num_slices=2, context=model.exploration_prior,
                         states_per_call=ref["observation"].shape[0])
    obs = ref["observation"].view(3, 2, -1).transpose(0, 1)  # BMPC's rows are time-major: t * n + b
    nan = torch.full((2, 3, 2), float("nan"))
    batch = TensorDict({"observation": obs, "expert": {"loc": nan, "scale": nan.clone()}}, [2, 3])
    perm = torch.arange(6).view(3, 2).t().reshape(-1)  # our rows are slice-major: b * H + t
    planner.draw_noise = lambda batch_, device, dtype: ref["noise"][perm]
    with set_exploration_type(ExplorationType.RANDOM):
        batch = hook.reanalyze(batch)
    close(batch["expert", "loc"].transpose(0, 1).reshape(6, 2), ref["expert_loc"])
    close(batch["expert", "scale"].transpose(0, 1).reshape(6, 2), ref["expert_scale"])


def test_acting_steps_equal_bmpc_s_own_mppi(model, reference):
    """BMPC's own setting, MPPI acting: warm-started steps with the acting prior and exploration noise; the action,
    the stored expert distribution and the final mean of every step."""
    ref = reference["acting"]
    planner = MPPIPlanner(model, expert_key="expert", **reference["reanalyze"]["planner"])
    for t in range(ref["observation"].shape[0]):
        planner.draw_noise = lambda batch, device, dtype, t=t: ref["noise"][t]
        td = TensorDict({"observation": ref["observation"][t], "is_init": torch.tensor([[t == 0]])}, [1])
        with set_exploration_type(ExplorationType.RANDOM):
            out = planner(td)
        close(out["action"], ref["action"][t])
        close(out["expert", "loc"], ref["expert_loc"][t])
        close(out["expert", "scale"], ref["expert_scale"][t])
        close(planner.last_plan, ref["mean"][t])


def test_committed_reference_is_what_the_generator_writes(reference, tmp_path):
    spec = importlib.util.spec_from_file_location("bmpc_reference", DATA / "bmpc_reference.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    if not generator.ARCHIVE.exists():
        pytest.skip(f"the peer's archive {generator.ARCHIVE} is not here")
    fresh = generator._detached(generator.generate())
    for part in ("model", "update", "reanalyze", "acting"):
        flat_fresh = TensorDict.from_dict(fresh[part]).flatten_keys(".")
        flat_ref = TensorDict.from_dict(reference[part]).flatten_keys(".")
        assert set(flat_fresh.keys()) == set(flat_ref.keys())
        for key in flat_ref.keys():
            torch.testing.assert_close(flat_fresh[key], flat_ref[key], atol=1e-6, rtol=0, equal_nan=True,
                                       msg=lambda m: f"{part}.{key}: {m}")
