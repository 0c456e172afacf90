"""Tests of the HumanoidBench adapter (torchrl_dreammpc.envs.humanoid).

Skipped unless HumanoidBench is installed (`.ci/install_humanoid_bench.sh` installs the cut-down copy that
ships with this workspace). Random actions make the walking robots fall within ~30-110 steps, so their
rollouts end early by termination; the full 1000-step episode is checked on ``h1-crawl``, which has no early
termination and steps in about 1 ms.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torchrl.envs import ParallelEnv
from torchrl.envs.utils import check_env_specs

from torchrl_dreammpc.envs import TaskNotAvailableError, UnknownTaskError, make_env, task_info

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("humanoid_bench") is None,
    reason="HumanoidBench is not installed (run .ci/install_humanoid_bench.sh, see docs/tasks.md)",
)

# (task, observation size, action size)
TASKS = [
    ("humanoid_h1hand-walk-v0", 151, 61),
    ("humanoid_h1hand-slide-v0", 151, 61),
    ("humanoid_h1-run-v0", 51, 19),
]


@pytest.mark.parametrize("task,obs_size,action_size", TASKS)
def test_build_specs_and_random_rollout(task, obs_size, action_size):
    torch.manual_seed(0)
    env = make_env(task, seed=0)
    check_env_specs(env)
    assert env.observation_spec["observation"].shape == (obs_size,)
    assert env.observation_spec["observation"].dtype == torch.float32
    assert env.action_spec.shape == (action_size,)
    assert torch.all(env.action_spec.space.low == -1) and torch.all(env.action_spec.space.high == 1)
    assert task_info(task).episode_length == 1000 and task_info(task).action_repeat == 1

    td = env.rollout(1000)  # random actions: stops at the first done
    n = td.shape[0]
    assert td["next", "observation"].dtype == torch.float32
    assert torch.isfinite(td["next", "observation"]).all()
    assert td["next", "step_count"][-1].item() == n
    torch.testing.assert_close(td["next", "episode_reward"][-1], td["next", "reward"].sum(0), rtol=1e-5, atol=1e-4)
    # no action repeat: one env step is one HumanoidBench step (frame_skip=10 physics steps of 2 ms)
    assert env.base_env.sim.data.time == pytest.approx(n * 10 * env.base_env.sim.model.opt.timestep)
    assert not td["next", "done"][:-1].any()


@pytest.mark.parametrize("task", ["humanoid_h1hand-walk-v0", "humanoid_h1-run-v0"])
def test_falling_is_terminated_not_truncated(task):
    torch.manual_seed(0)
    env = make_env(task, seed=0)
    td = env.rollout(1000)
    assert td.shape[0] < 1000
    assert td["next", "terminated"][-1].item() and td["next", "done"][-1].item()
    assert not td["next", "truncated"].any()
    # HumanoidBench's fall test: pelvis below 0.2 m
    assert env.base_env.sim.data.qpos[2] < 0.2


def test_episodic_false_ends_the_same_episode_as_a_time_limit():
    """make_env(episodic=False): the fall still ends the episode at the same step, reported as truncated
    (TerminationAsTruncation); what recipes/train.py episodic=false trains on."""
    rollouts = {}
    for episodic in (None, False):
        torch.manual_seed(0)
        rollouts[episodic] = make_env("humanoid_h1hand-stand-v0", seed=0, episodic=episodic).rollout(1000)
    terminal, time_limit = rollouts[None]["next"], rollouts[False]["next"]
    assert terminal.shape == time_limit.shape and terminal.shape[0] < 1000
    torch.testing.assert_close(terminal["observation"], time_limit["observation"])
    assert terminal["terminated"][-1].item() and not time_limit["terminated"].any()
    assert time_limit["truncated"][-1].item() and time_limit["done"][-1].item()
    assert not time_limit["done"][:-1].any()


def test_episodic_false_builds_a_model_without_termination_and_its_env(tmp_path):
    from omegaconf import OmegaConf

    from test_recipes import TINY, compose_train
    from torchrl_dreammpc.envs import TerminationAsTruncation
    from torchrl_dreammpc.trainers.builders import ConfigError, build_trainer, validate_train_config

    tiny = ["model_size='1'" if arg == "model_size=1" else arg for arg in TINY]
    for episodic, terminal in (("null", True), ("false", False)):
        cfg = compose_train(*tiny, "task=humanoid_h1hand-stand-v0", "seed_steps=200", "steps=300",
                            f"episodic={episodic}", f"run_dir={tmp_path / episodic}")
        trainer, world_model = build_trainer(OmegaConf.to_container(OmegaConf.create(cfg), resolve=True))
        assert (world_model.termination_head is not None) is terminal
        transforms = list(trainer.collector.env.transform)
        assert any(isinstance(t, TerminationAsTruncation) for t in transforms) is not terminal
        trainer.evaluation.shutdown()
        trainer.collector.shutdown()
    cfg = compose_train("model_size='1'", "steps=5000", "episodic=true", "run_dir=unused")
    with pytest.raises(ConfigError, match="episodic=True: episodes of cartpole-swingup never end early"):
        validate_train_config(cfg)


def test_full_length_episode_is_truncated_at_1000():
    torch.manual_seed(0)
    env = make_env("humanoid_h1-crawl-v0", seed=0)  # no early termination in crawl
    td = env.rollout(1100)
    assert td.shape == (1000,)
    assert td["next", "truncated"][-1].item() and not td["next", "terminated"].any()
    assert not td["next", "done"][:-1].any()


def test_seed_reproduces_first_observations():
    task = "humanoid_h1hand-walk-v0"
    first = make_env(task, seed=1).reset()["observation"]
    torch.testing.assert_close(make_env(task, seed=1).reset()["observation"], first, rtol=0, atol=0)
    assert not torch.equal(make_env(task, seed=2).reset()["observation"], first)
    env = make_env(task, seed=3)
    env.reset()
    env.set_seed(1)
    torch.testing.assert_close(env.reset()["observation"], first, rtol=0, atol=0)


def test_parallel_env_of_two():
    env = make_env("humanoid_h1-walk-v0", seed=0, num_envs=2, parallel=True)
    try:
        assert isinstance(env.base_env, ParallelEnv)
        td = env.rollout(3)
        assert td.shape == (2, 3)
        assert td["next", "observation"].shape == (2, 3, 51)
        assert not torch.equal(td["observation"][0, 0], td["observation"][1, 0])  # distinct worker seeds
    finally:
        env.close()


def test_mujoco_sizes_table_replaced_in_memory():
    make_env("humanoid_h1-walk-v0")
    from dm_control.mujoco.wrapper.mjbindings import sizes
    from humanoid_bench.dmc_deps import dmc_sizes

    assert dmc_sizes.array_sizes is sizes.array_sizes
    # HumanoidBench's file itself is untouched (it still describes the MuJoCo it was generated for)
    with open(dmc_sizes.__file__) as f:
        assert "MuJoCo header version: 316" in f.read()


def test_mujoco_gl_defaults_to_egl(monkeypatch):
    from torchrl_dreammpc.envs import humanoid

    monkeypatch.delenv("MUJOCO_GL", raising=False)
    humanoid._import_humanoid_bench()
    assert os.environ["MUJOCO_GL"] == "egl"
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    humanoid._import_humanoid_bench()
    assert os.environ["MUJOCO_GL"] == "osmesa"  # a user's choice is kept


def _asset_missing(relative: str) -> bool:
    import humanoid_bench

    return not os.path.exists(os.path.join(os.path.dirname(humanoid_bench.__file__), "assets", relative))


def test_missing_asset_names_task_and_file():
    if not _asset_missing("tasks/assets/kitchen-wood.png"):
        pytest.skip("this HumanoidBench install has the push task's assets")
    with pytest.raises(TaskNotAvailableError) as err:
        make_env("humanoid_h1hand-push-v0")
    assert "humanoid_h1hand-push-v0" in str(err.value) and "kitchen-wood.png" in str(err.value)


def test_robot_without_files_names_task_and_file():
    if not _asset_missing("envs/g1_torque_walk.xml"):
        pytest.skip("this HumanoidBench install has the g1 robot")
    with pytest.raises(TaskNotAvailableError) as err:
        make_env("humanoid_g1-walk-v0")
    assert "humanoid_g1-walk-v0" in str(err.value) and "g1_torque_walk.xml" in str(err.value)


def test_unknown_robot_is_unknown_task():
    with pytest.raises(UnknownTaskError, match="humanoid_h1-walk-v0"):
        make_env("humanoid_h2-walk-v0")


def test_static_task_table_matches_installed_registry():
    import gymnasium as gym
    import humanoid_bench.env as hb_env
    from torchrl_dreammpc.envs import humanoid

    humanoid._import_humanoid_bench()
    assert set(humanoid.ROBOTS) == set(hb_env.ROBOTS)
    assert set(humanoid.EPISODE_LENGTHS) == set(hb_env.TASKS)
    for name, length in humanoid.EPISODE_LENGTHS.items():
        assert gym.spec(f"h1hand-{name}-v0").max_episode_steps == length, name


def test_collector_with_gradient_planner_on_h1hand():
    """Dream-MPC copes with HumanoidBench's 151-dim observations and 61-dim actions inside a TorchRL collector."""
    from torchrl.collectors import Collector

    from torchrl_dreammpc.modules import TDMPC2WorldModel
    from torchrl_dreammpc.planners import GradientMPCPlanner

    torch.manual_seed(0)
    env = make_env("humanoid_h1hand-walk-v0", seed=0)
    wm = TDMPC2WorldModel(env.observation_spec["observation"], env.action_spec, model_size=1,
                          enc_dim=32, mlp_dim=32, latent_dim=16).eval()
    planner = GradientMPCPlanner(wm, num_candidates=5, horizon=3, iterations=1, lr=0.1, action_spec=env.action_spec)
    collector = Collector(env, planner, frames_per_batch=40, total_frames=40)
    batches = list(collector)
    collector.shutdown()
    assert len(batches) == 1
    batch = batches[0]
    assert batch.numel() == 40
    assert batch["observation"].shape[-1] == 151
    assert batch["action"].shape[-1] == 61
    assert torch.isfinite(batch["action"]).all() and batch["action"].abs().max() <= 1
    assert batch["action"].std(0).sum() > 0  # sampled candidates: the actions vary from step to step


def test_render_frames_with_humanoid_bench_cameras():
    from torchrl_dreammpc.envs import make_base_env

    env = make_base_env("humanoid_h1-walk-v0", seed=0)
    assert env.default_camera == "cam_default"  # HumanoidBench's video camera for the task, following the robot
    assert make_base_env("humanoid_h1-hurdle-v0", seed=0).default_camera == "cam_hurdle"
    env.reset()
    try:
        first = env.render(height=24, width=32)
    except RuntimeError as err:
        pytest.skip(f"MuJoCo has no offscreen GL backend here: {err}")
    for _ in range(5):
        env.step(env.full_action_spec.zero().set("action", torch.ones(19)))
    last = env.render(height=24, width=32)  # a HumanoidBench frame takes ~1 s on a CPU GL renderer
    for frame in (first, last):
        assert frame.shape == (24, 32, 3) and frame.dtype.name == "uint8" and frame.std() > 5
    assert not (first == last).all()
    env.close()
