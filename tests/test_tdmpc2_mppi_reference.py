"""``MPPIPlanner`` against TD-MPC2's MPPI (its public code, github.com/nicklashansen/tdmpc2@e9f5932), step by step.

``tests/data/tdmpc2_mppi_reference.pt`` was written by ``tests/data/tdmpc2_mppi_reference.py``: the peer's ``act``
over 6 control steps of 2 envs (warm-started from the previous final mean; one env starts a new episode midway) on
fixed weights and observations, in float64, with its randomness pinned to the numbers ``MPPIPlanner`` consumes
(see the generator's docstring). Ours replays the same steps as one batch of 2 envs; the actions and the final
MPPI means must agree to 1e-6. When the peer's code is present (``../shared/peers``), the reference is also
regenerated and compared with the committed file.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_dreammpc.checkpoints import load_any
from torchrl_dreammpc.planners import MPPIPlanner

DATA = Path(__file__).resolve().parent / "data"
REFERENCE = DATA / "tdmpc2_mppi_reference.pt"
PLAN_KEYS = ("num_samples", "num_elites", "num_pi_trajs", "iterations", "horizon", "temperature", "min_std",
             "max_std")
ATOL = 1e-6

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, DATA / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE, weights_only=True)


def make_planner(case: dict) -> MPPIPlanner:
    cfg = case["config"]
    model = load_any(case["state_dict"], cfg["obs_dim"], cfg["action_dim"], discount=cfg["discount"]).double()
    assert (model.config.num_q, model.config.episodic) == (cfg["num_q"], cfg["episodic"])
    return MPPIPlanner(model, **{k: cfg[k] for k in PLAN_KEYS})


@pytest.mark.parametrize("mode", ["explore", "eval"])
@pytest.mark.parametrize("case", ["q5", "episodic_q3"])
def test_mppi_steps_equal_tdmpc2(reference, case, mode, monkeypatch):
    ref = reference[case][mode]
    planner = make_planner(reference[case])
    peer_noise = _load("peer_noise")
    T, B = ref["action"].shape[:2]
    exploration = ExplorationType.RANDOM if mode == "explore" else ExplorationType.DETERMINISTIC
    assert ref["is_init"][1:].any() and not ref["is_init"][1:].all()  # a warm start and a reset within a batch
    for t in range(T):
        noise = ref["noise"][t].double()
        monkeypatch.setattr(planner, "draw_noise", lambda batch, device, dtype, noise=noise: noise)
        randperm = peer_noise.ScriptedRandperm(list(ref["perms"][t]))  # the Q-head pair of each iteration
        td = TensorDict({"observation": ref["observation"][t].double(), "is_init": ref["is_init"][t]}, [B])
        with monkeypatch.context() as m, torch.no_grad(), set_exploration_type(exploration):
            m.setattr(torch, "randperm", randperm)
            action = planner(td)["action"]
        assert not randperm.perms, f"step {t}: {len(randperm.perms)} Q pairs not drawn (one per iteration)"
        torch.testing.assert_close(action, ref["action"][t], atol=ATOL, rtol=0, msg=lambda m: f"step {t}: {m}")
        torch.testing.assert_close(planner.last_plan, ref["mean"][t], atol=ATOL, rtol=0,
                                   msg=lambda m: f"step {t}, final mean: {m}")


def test_committed_reference_is_what_the_generator_writes(reference):
    generator = _load("tdmpc2_mppi_reference")
    if not generator.PEER.is_file():
        pytest.skip(f"TD-MPC2's code is not here ({generator.PEER})")
    fresh = generator.generate()
    for case in generator.CASES:
        for key, value in reference[case]["state_dict"].items():
            assert torch.equal(fresh[case]["state_dict"][key], value), key
        for mode in generator.MODES:
            for key, value in reference[case][mode].items():
                torch.testing.assert_close(fresh[case][mode][key], value, atol=1e-9, rtol=0,
                                           msg=lambda m: f"{case}.{mode}.{key}: {m}")
