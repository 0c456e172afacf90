"""Tests of the task suite (torchrl_dreammpc.envs): DMC, Meta-World, the shared base env and make_env."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchrl.envs import ParallelEnv, SerialEnv, TransformedEnv
from torchrl.envs.utils import check_env_specs

from torchrl_dreammpc.envs import (
    TaskInfo,
    TaskNotAvailableError,
    UnknownTaskError,
    available_tasks,
    make_base_env,
    make_env,
    task_info,
)
from torchrl_dreammpc.envs._base import SimStep, SuiteEnv

# (task, observation size, action size)
SUITE_TASKS = [
    ("cartpole-swingup", 5, 1),
    ("walker-walk", 24, 6),
    ("mw-reach", 39, 4),
    ("mw-pick-place-wall", 39, 4),
]


def _first_observation(env) -> torch.Tensor:
    return env.reset()["observation"]


@pytest.mark.parametrize("task,obs_size,action_size", SUITE_TASKS)
def test_build_reset_step_and_specs(task, obs_size, action_size):
    torch.manual_seed(0)
    env = make_env(task, seed=0)
    assert isinstance(env, TransformedEnv)
    check_env_specs(env)
    assert env.observation_spec["observation"].shape == (obs_size,)
    assert env.observation_spec["observation"].dtype == torch.float32
    assert env.action_spec.shape == (action_size,)
    assert torch.all(env.action_spec.space.low == -1) and torch.all(env.action_spec.space.high == 1)

    td = env.rollout(5)
    assert td.shape == (5,)
    assert td["next", "observation"].dtype == torch.float32
    assert td["next", "reward"].dtype == torch.float32
    assert torch.isfinite(td["next", "observation"]).all()
    # the transforms' entries: is_init only on the reset step, step_count counts agent steps, episode_reward sums
    assert td["is_init"].squeeze(-1).tolist() == [True, False, False, False, False]
    assert td["next", "step_count"].squeeze(-1).tolist() == [1, 2, 3, 4, 5]
    torch.testing.assert_close(td["next", "episode_reward"][-1], td["next", "reward"].sum(0))
    assert not td["next", "done"].any()
    assert (("next", "success") in td.keys(True)) == task.startswith("mw-")


@pytest.mark.parametrize("task", ["cartpole-swingup", "mw-reach"])
def test_seed_reproduces_first_observations(task):
    first = _first_observation(make_env(task, seed=1))
    torch.testing.assert_close(_first_observation(make_env(task, seed=1)), first, rtol=0, atol=0)
    assert not torch.equal(_first_observation(make_env(task, seed=2)), first)
    # set_seed on a built env restarts the same sequence of initial states
    env = make_env(task, seed=5)
    env.reset()
    env.set_seed(1)
    torch.testing.assert_close(_first_observation(env), first, rtol=0, atol=0)
    # consecutive resets of one env draw new initial states
    assert not torch.equal(_first_observation(env), first)


def test_same_seed_same_actions_same_trajectory():
    actions = torch.rand(10, 6) * 2 - 1
    out = []
    for _ in range(2):
        env = make_env("walker-walk", seed=3)
        td = env.reset()
        observations = []
        for action in actions:
            td = env.step(td.set("action", action))
            observations.append(td["next", "observation"])
            td = td["next"]
        out.append(torch.stack(observations))
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


def test_dmc_episode_is_500_agent_steps_and_truncated():
    env = make_env("cartpole-swingup", seed=0)
    td = env.rollout(600)  # stops at the first done
    assert td.shape == (500,)
    assert td["next", "truncated"][-1].item() and td["next", "done"][-1].item()
    assert not td["next", "terminated"].any()
    assert not td["next", "done"][:-1].any()
    assert td["next", "step_count"][-1].item() == 500
    # 500 agent steps with action repeat 2 are the suite's 1000 control steps
    sim = env.base_env.sim
    assert env.base_env.physics.data.time == pytest.approx(1000 * sim.control_timestep())


def test_auto_reset_after_time_limit_marks_is_init():
    env = make_env("cartpole-swingup", seed=0)
    td = env.rollout(502, break_when_any_done=False)
    assert td["next", "truncated"][499].item()
    # the step after the time limit starts from a reset: InitTracker flags it and StepCounter restarts
    assert td["is_init"][500].item() and not td["is_init"][499].item()
    assert td["next", "step_count"][500].item() == 1
    assert td["next", "episode_reward"][500].item() == pytest.approx(td["next", "reward"][500].item())


def test_dmc_action_repeat_advances_two_control_steps_and_sums_rewards():
    from dm_control import suite

    def flat(time_step):
        return np.concatenate([np.asarray(v).ravel() for v in time_step.observation.values()])

    env = make_env("walker-walk", seed=4)
    raw = suite.load("walker", "walk", task_kwargs={"random": 4})  # the same task, seeded the same way
    td = env.reset()
    np.testing.assert_allclose(td["observation"].numpy(), flat(raw.reset()), rtol=1e-6)

    action = torch.linspace(-1, 1, 6)
    td = env.step(td.set("action", action))["next"]
    assert env.base_env.physics.data.time == pytest.approx(2 * env.base_env.sim.control_timestep())
    replay = [raw.step(action.double().numpy()) for _ in range(2)]
    assert td["reward"].item() == pytest.approx(replay[0].reward + replay[1].reward, rel=1e-5)
    np.testing.assert_allclose(td["observation"].numpy(), flat(replay[1]), rtol=1e-5, atol=1e-6)


def test_metaworld_episode_action_repeat_and_success_key():
    env = make_env("mw-reach", seed=0)
    td = env.rollout(150)
    assert td.shape == (100,)
    assert td["next", "truncated"][-1].item() and not td["next", "terminated"].any()
    assert not td["next", "done"][:-1].any()
    assert td["next", "success"].dtype == torch.bool and td["next", "success"].shape == (100, 1)
    assert td["success"][0].item() is False  # reset writes success=False
    # 100 agent steps with action repeat 2 are 200 Meta-World steps
    assert env.base_env.sim.curr_path_length == 200


def test_metaworld_reward_is_sum_over_repeated_steps():
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

    env = make_env("mw-reach", seed=7)
    td = env.reset()
    action = torch.tensor([0.5, -0.3, 0.2, 1.0])
    td = env.step(td.set("action", action))["next"]

    raw = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE["reach-v3-goal-observable"](seed=7)
    raw._freeze_rand_vec, raw.seeded_rand_vec = False, True
    raw.seed(7)
    obs0, _ = raw.reset()
    np.testing.assert_allclose(make_env("mw-reach", seed=7).reset()["observation"].numpy(), obs0, rtol=1e-6)
    steps = [raw.step(action.numpy()) for _ in range(2)]
    assert raw.curr_path_length == 2 and env.base_env.sim.curr_path_length == 2
    assert td["reward"].item() == pytest.approx(steps[0][1] + steps[1][1], rel=1e-5)
    np.testing.assert_allclose(td["observation"].numpy(), steps[1][0], rtol=1e-6)


def test_metaworld_goal_changes_between_episodes():
    env = make_env("mw-reach", seed=0)
    goals = [env.reset()["observation"][-3:] for _ in range(3)]
    assert not torch.equal(goals[0], goals[1]) and not torch.equal(goals[1], goals[2])


@pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")
def test_metaworld_success_with_scripted_policy():
    from metaworld.policies import SawyerReachV3Policy

    policy = SawyerReachV3Policy()
    env = make_env("mw-reach", seed=0)
    td = env.reset()
    success = []
    for _ in range(60):
        action = torch.as_tensor(policy.get_action(td["observation"].double().numpy()), dtype=torch.float32)
        td = env.step(td.set("action", action))
        success.append(td["next", "success"].item())
        td = td["next"]
    assert success[-1] and not success[0]
    first = success.index(True)
    assert all(success[first:])


def test_dog_run_builds_and_steps():
    env = make_env("dog-run", seed=0)
    td = env.rollout(3)
    assert td["next", "observation"].shape == (3, 223)
    assert env.action_spec.shape == (38,)


@pytest.mark.parametrize(
    "task,forward,reset_speed",
    [("cheetah-run-backwards", "cheetah-run", -12.0), ("walker-run-backwards", "walker-run", -10.0)],
)
def test_backwards_tasks_reward_moving_backwards(task, forward, reset_speed):
    rewards = {}
    for name in (task, forward):
        base = make_base_env(name, seed=0)
        base.reset()
        physics = base.physics
        with physics.reset_context():
            physics.named.data.qvel["rootx"] = reset_speed  # fast towards -x
        rewards[name] = base.sim.task.get_reward(physics)
    # the backwards task pays its full move bonus, the forward task none of it (walker keeps its 1/6 stand part)
    assert rewards[task] > 0.5
    assert rewards[forward] < 0.2


@pytest.mark.parametrize("task", ["walker-walk-backwards", "hopper-hop-backwards"])
def test_backwards_tasks_build(task):
    env = make_env(task, seed=0)
    check_env_specs(env)
    assert task_info(task).episode_length == 500


def test_task_info():
    assert task_info("walker-walk") == TaskInfo("walker-walk", "dmc", 500, 2, False, False)
    assert task_info("mw-pick-place-wall") == TaskInfo("mw-pick-place-wall", "metaworld", 100, 2, False, True)
    hb = task_info("humanoid_h1hand-walk-v0")  # needs no HumanoidBench install
    assert (hb.suite, hb.episode_length, hb.action_repeat, hb.episodic) == ("humanoid_bench", 1000, 1, True)
    assert task_info("humanoid_h1hand-cube-v0").episode_length == 500
    assert task_info("walker-walk").simulator_steps == 1000
    # the suite's own spellings map onto TD-MPC2's names
    assert task_info("ball_in_cup-catch").task == "cup-catch"
    assert task_info("point_mass-easy").task == "pointmass-easy"
    assert task_info("cartpole-balance_sparse").task == "cartpole-balance-sparse"
    assert task_info("humanoid_CMU-run").suite == "dmc"


def test_available_tasks_cover_tdmpc2_names():
    dmc, mw = set(available_tasks("dmc")), set(available_tasks("metaworld"))
    mt30_standard = {
        "walker-stand", "walker-walk", "walker-run", "cheetah-run", "reacher-easy", "reacher-hard",
        "acrobot-swingup", "pendulum-swingup", "cartpole-balance", "cartpole-balance-sparse", "cartpole-swingup",
        "cartpole-swingup-sparse", "cup-catch", "finger-spin", "finger-turn-easy", "finger-turn-hard", "fish-swim",
        "hopper-stand", "hopper-hop", "dog-run", "quadruped-walk", "humanoid-walk",
    }  # fmt: skip
    assert mt30_standard <= dmc
    assert {"walker-walk-backwards", "walker-run-backwards", "cheetah-run-backwards"} <= dmc
    assert len(mw) == 50 and {"mw-reach", "mw-pick-place-wall", "mw-bin-picking"} <= mw
    assert "humanoid_h1hand-walk-v0" in available_tasks("humanoid_bench")
    with pytest.raises(ValueError, match="Unknown suite"):
        available_tasks("atari")


@pytest.mark.parametrize(
    "task,suggestion",
    [
        ("walker-wlak", "walker-walk"),
        ("mw-reahc", "mw-reach"),
        ("cartpole-swingpu", "cartpole-swingup"),
        ("humanoid_h1hand-wlak-v0", "humanoid_h1hand-walk-v0"),
    ],
)
def test_unknown_task_names_close_matches(task, suggestion):
    with pytest.raises(UnknownTaskError, match=repr(suggestion)) as err:
        make_env(task)
    assert isinstance(err.value, ValueError)
    assert repr(task) in str(err.value)


def test_unknown_task_without_close_match():
    with pytest.raises(ValueError, match="Unknown task 'zzz'"):
        task_info("zzz")
    with pytest.raises(TypeError, match="must be a str"):
        task_info(3)


def test_lqr_is_rejected():
    with pytest.raises(TaskNotAvailableError, match="lqr"):
        task_info("lqr-lqr-2-1")


def test_bad_options():
    with pytest.raises(TypeError, match="'num_env'.*'num_envs'"):
        make_env("cartpole-swingup", num_env=2)
    with pytest.raises(TypeError, match="'frame_skip'"):
        make_env("cartpole-swingup", frame_skip=4)
    with pytest.raises(ValueError, match="num_envs"):
        make_env("cartpole-swingup", num_envs=0)
    with pytest.raises(ValueError, match="parallel"):
        make_env("cartpole-swingup", num_envs=2, parallel="yes")
    with pytest.raises(ValueError, match=r"episodic must be a bool or None \(the task's own\), got 'yes'"):
        make_env("cartpole-swingup", episodic="yes")
    with pytest.raises(ValueError, match="episodic=True: episodes of cartpole-swingup never end early"):
        make_env("cartpole-swingup", episodic=True)
    make_env("cartpole-swingup", episodic=False).close()  # a task that never ends early: nothing to change


def test_missing_humanoid_bench_says_how_to_install(monkeypatch):
    from torchrl_dreammpc.envs import humanoid

    monkeypatch.setattr(humanoid, "is_installed", lambda: False)
    with pytest.raises(ImportError) as err:
        make_env("humanoid_h1hand-walk-v0")
    message = str(err.value)
    assert "git clone https://github.com/carlosferrazza/humanoid-bench" in message
    assert "pip install --no-deps -e humanoid-bench" in message
    assert 'pip install "jax[cpu]"' in message


def test_device_is_honoured():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        env = make_env("cartpole-swingup", seed=0, device=device)
        td = env.rollout(2)
        assert td.device.type == device
        assert td["next", "observation"].device.type == device
        assert env.action_spec.device.type == device


def test_serial_env_batches_and_seeds_workers_distinctly():
    env = make_env("cartpole-swingup", seed=3, num_envs=3)
    assert isinstance(env.base_env, SerialEnv)
    first = _first_observation(env)
    assert first.shape == (3, 5)
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    # worker 0 is seeded like an unbatched env with the same seed; the whole batch is reproducible
    torch.testing.assert_close(first[0], _first_observation(make_env("cartpole-swingup", seed=3)), rtol=0, atol=0)
    again = _first_observation(make_env("cartpole-swingup", seed=3, num_envs=3))
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    check_env_specs(env)
    td = env.rollout(4)
    assert td.shape == (3, 4)
    assert td["next", "step_count"][:, -1].squeeze(-1).tolist() == [4, 4, 4]


def test_parallel_env_steps_and_matches_serial_seeding():
    env = make_env("cartpole-swingup", seed=3, num_envs=2, parallel=True)
    try:
        assert isinstance(env.base_env, ParallelEnv)
        td = env.rollout(2)
        assert td.shape == (2, 2)
        assert td["next", "step_count"][:, -1].tolist() == [[2], [2]]
        serial = make_env("cartpole-swingup", seed=3, num_envs=2).reset()["observation"]
        torch.testing.assert_close(td["observation"][:, 0], serial, rtol=0, atol=0)
    finally:
        env.close()


# -- TD-MPC2's own DMC tasks ----------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
TDMPC2_ENVS = REPO.parent / "shared" / "peers" / "tdmpc2-e9f5932-envs.tar.gz"
PUBLISHED_TDMPC2 = REPO.parent / "shared" / "reference" / "published-results" / "tdmpc2"

# (task, observation size, action size, TD-MPC2's module in tdmpc2/envs/tasks/ and the factory defining it there)
TDMPC2_TASKS = [
    ("walker-walk-backwards", 24, 6, "walker", "walk_backwards"),
    ("walker-run-backwards", 24, 6, "walker", "run_backwards"),
    ("cheetah-run-backwards", 17, 6, "cheetah", "run_backwards"),
    ("hopper-hop-backwards", 15, 4, "hopper", "hop_backwards"),
    ("cheetah-run-front", 17, 6, "cheetah", "run_front"),
    ("cheetah-run-back", 17, 6, "cheetah", "run_back"),
    ("cheetah-jump", 17, 6, "cheetah", "jump"),
    ("reacher-three-easy", 8, 3, "reacher", "three_easy"),
    ("reacher-three-hard", 8, 3, "reacher", "three_hard"),
    ("cup-spin", 8, 2, "ball_in_cup", "spin"),
    ("pendulum-spin", 3, 1, "pendulum", "spin"),
]

# The 39 DMControl tasks TD-MPC2 publishes results for (../shared/reference/published-results/tdmpc2/).
PUBLISHED_DMC_TASKS = [
    "acrobot-swingup", "cartpole-balance", "cartpole-balance-sparse", "cartpole-swingup", "cartpole-swingup-sparse",
    "cheetah-jump", "cheetah-run", "cheetah-run-back", "cheetah-run-backwards", "cheetah-run-front", "cup-catch",
    "cup-spin", "dog-run", "dog-stand", "dog-trot", "dog-walk", "finger-spin", "finger-turn-easy",
    "finger-turn-hard", "fish-swim", "hopper-hop", "hopper-hop-backwards", "hopper-stand", "humanoid-run",
    "humanoid-stand", "humanoid-walk", "pendulum-spin", "pendulum-swingup", "quadruped-run", "quadruped-walk",
    "reacher-easy", "reacher-hard", "reacher-three-easy", "reacher-three-hard", "walker-run",
    "walker-run-backwards", "walker-stand", "walker-walk", "walker-walk-backwards",
]  # fmt: skip


def _flat(time_step) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in time_step.observation.values()])


@pytest.fixture(scope="module")
def tdmpc2_tasks(tmp_path_factory):
    """TD-MPC2's task modules (tdmpc2/envs/tasks/*.py of the peer archive), imported as they are."""
    if not TDMPC2_ENVS.exists():
        pytest.skip(f"TD-MPC2's task definitions are not here ({TDMPC2_ENVS})")
    import importlib.util
    import tarfile

    from dm_control import suite as dm_suite
    from dm_control.utils import containers

    root = tmp_path_factory.mktemp("tdmpc2")
    with tarfile.open(TDMPC2_ENVS) as archive:
        archive.extractall(root, filter="data")
    modules = {}
    with pytest.MonkeyPatch.context() as patch:
        for name in sorted({row[3] for row in TDMPC2_TASKS}):
            # on import they add their tasks to dm_control's per-domain registries: give them throwaway ones
            patch.setattr(getattr(dm_suite, name), "SUITE", containers.TaggedTasks())
            spec = importlib.util.spec_from_file_location(f"tdmpc2_{name}", root / "tdmpc2/envs/tasks" / f"{name}.py")
            modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(modules[name])
    return modules


def _model_arrays_that_differ(ours, theirs) -> list[str]:
    differ = []
    for name in dir(ours):
        value = getattr(ours, name, None) if not name.startswith("_") else None
        if isinstance(value, np.ndarray) and not np.array_equal(value, getattr(theirs, name), equal_nan=True):
            differ.append(name)
    return differ


def _set_random_state(physics_pair, rng, task):
    """Puts both simulations in the same random state: joints moved and spun, far from the initial states."""
    physics = physics_pair[0]
    scale = rng.choice([0.1, 1.0])
    qpos = physics.data.qpos + rng.uniform(-scale, scale, physics.model.nq)
    qvel = rng.normal(0.0, 6.0, physics.model.nv)
    offset = rng.uniform(-0.08, 0.08, 2)  # reacher: the target near the finger, inside or outside its radius
    for physics in physics_pair:
        with physics.reset_context():
            physics.data.qpos[:], physics.data.qvel[:] = qpos, qvel
        if task.startswith("reacher"):
            physics.named.model.geom_pos["target", :2] = physics.named.data.geom_xpos["finger", :2] + offset
            physics.forward()


@pytest.mark.parametrize("task,obs_size,action_size,module,factory", TDMPC2_TASKS)
def test_tdmpc2_task_matches_tdmpc2s_definition(tdmpc2_tasks, task, obs_size, action_size, module, factory):
    from tensordict import TensorDict

    ours = make_base_env(task, seed=3)
    theirs = getattr(tdmpc2_tasks[module], factory)(random=3)
    # the same body: every array of the two compiled MuJoCo models is equal
    assert _model_arrays_that_differ(ours.physics.model.ptr, theirs.physics.model.ptr) == []
    assert ours.observation_spec["observation"].shape == (obs_size,)
    assert sum(int(np.prod(v.shape)) for v in theirs.observation_spec().values()) == obs_size
    assert ours.action_spec.shape == theirs.action_spec().shape == (action_size,)

    # the same initial states, steps, observations and rewards (TD-MPC2 repeats each action twice)
    np.testing.assert_allclose(ours.reset()["observation"].numpy(), _flat(theirs.reset()), rtol=1e-6, atol=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(25):
        action = rng.uniform(-1, 1, action_size).astype(np.float32)
        td = ours.step(TensorDict({"action": torch.from_numpy(action)}, []))["next"]
        steps = [theirs.step(action.astype(np.float64)) for _ in range(2)]
        np.testing.assert_allclose(td["observation"].numpy(), _flat(steps[1]), rtol=1e-5, atol=1e-5)
        assert td["reward"].item() == pytest.approx(steps[0].reward + steps[1].reward, rel=1e-6, abs=1e-6)

    # the same reward function on states far from where an episode starts
    values = []
    for _ in range(200):
        _set_random_state((ours.physics, theirs.physics), rng, task)
        value = ours.sim.task.get_reward(ours.physics)
        assert value == pytest.approx(theirs.task.get_reward(theirs.physics), rel=1e-12, abs=1e-12)
        values.append(value)
    assert max(values) - min(values) > 0.3  # the states reach different parts of the reward


@pytest.mark.parametrize("task,obs_size,action_size", [row[:3] for row in TDMPC2_TASKS])
def test_tdmpc2_task_specs_and_full_rollout(task, obs_size, action_size):
    env = make_env(task, seed=0)
    check_env_specs(env)
    assert env.observation_spec["observation"].shape == (obs_size,)
    assert env.action_spec.shape == (action_size,)
    torch.manual_seed(0)
    td = env.rollout(600)
    assert td.shape == (500,) and td["next", "truncated"][-1].item() and not td["next", "terminated"].any()
    assert torch.isfinite(td["next", "observation"]).all()
    reward = td["next", "reward"]
    assert ((reward >= 0) & (reward <= 2)).all()  # two control steps of rewards in [0, 1]


def test_spin_task_rewards_at_set_states():
    # pendulum-spin: full reward from 9 rad/s either way, falling linearly to 0.5 at 4.5 rad/s and 0 at rest
    env = make_base_env("pendulum-spin", seed=0)
    env.reset()
    physics, expected = env.physics, {0.0: 0.0, 4.5: 0.5, -6.75: 0.75, 9.0: 1.0, -12.0: 1.0}
    for speed, reward in expected.items():
        with physics.reset_context():
            physics.named.data.qvel["hinge"] = speed
        assert env.sim.task.get_reward(physics) == pytest.approx(reward)
    # cup-spin: nothing while the ball is in the cup, however fast; far (>= 0.5 m) and fast (>= 6 m/s) pays 1
    env = make_base_env("cup-spin", seed=0)
    env.reset()
    physics = env.physics
    assert physics.in_target() == 1.0  # it starts in the cup (90 % of episodes; seed 0 is one of them)
    in_cup = physics.data.qpos.copy()
    with physics.reset_context():
        physics.data.qpos[:] = in_cup  # the ball where it is ...
        physics.named.data.qvel[["ball_x", "ball_z"]] = [8.0, 0.0]  # ... and fast
    assert env.sim.task.get_reward(physics) == 0.0
    with physics.reset_context():
        physics.named.data.qpos[["ball_x", "ball_z"]] = [0.6, -0.1]
        physics.named.data.qvel[["ball_x", "ball_z"]] = [0.0, -8.0]
    assert physics.in_target() == 0.0
    assert env.sim.task.get_reward(physics) == pytest.approx(1.0)


def test_three_link_reacher_body():
    env = make_base_env("reacher-three-easy", seed=0)
    env.reset()
    physics = env.physics
    model = physics.named.model
    assert list(model.jnt_range.axes.row.names) == ["shoulder0", "shoulder1", "wrist"]
    np.testing.assert_allclose(np.degrees(model.jnt_range[["shoulder1", "wrist"]]), [[-80, 80], [-80, 80]])
    assert model.jnt_limited["shoulder0"] == 0
    assert list(model.actuator_gear.axes.row.names) == ["shoulder0", "shoulder1", "wrist"]
    with physics.reset_context():
        physics.data.qpos[:] = 0.0  # stretched out along x: three 9 cm links
    np.testing.assert_allclose(physics.named.data.geom_xpos["finger", :2], [0.27, 0.0], atol=1e-9)
    assert physics.model.opt.timestep == 0.02 and env.sim.control_timestep() == 0.02


def test_every_published_tdmpc2_dmc_task_builds():
    if PUBLISHED_TDMPC2.exists():  # the list above is the published one
        import dm_control.suite

        domains = {dmc_domain.replace("ball_in_cup", "cup").replace("point_mass", "pointmass")
                   for dmc_domain in dm_control.suite._DOMAINS}
        published = sorted(p.stem for p in PUBLISHED_TDMPC2.glob("*.csv") if p.stem.split("-")[0] in domains)
        assert published == sorted(PUBLISHED_DMC_TASKS)
    assert len(PUBLISHED_DMC_TASKS) == 39
    for task in PUBLISHED_DMC_TASKS:
        assert task_info(task).task == task
        env = make_env(task, seed=0)
        assert env.rollout(2)["next", "observation"].shape[0] == 2, task
        env.close()


# -- rendering -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task,camera", [("cartpole-swingup", 0), ("quadruped-walk", 2), ("reacher-three-easy", 0), ("mw-reach", "corner4")]
)
def test_render_frames_of_dmc_and_metaworld(gl, task, camera):
    env = make_env(task, seed=0)
    base = env.base_env
    assert base.default_camera == camera
    td = env.reset()
    frames = [base.render(height=48, width=64)]
    for _ in range(4):
        td = env.step(td.set("action", torch.ones(env.action_spec.shape)))["next"]
        frames.append(base.render(height=48, width=64))
    for frame in frames:
        assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
        assert frame.std() > 5  # a picture, not a blank buffer
    assert not np.array_equal(frames[0], frames[-1])  # the scene moved, and each frame is its own array
    assert base.render(height=48, width=64, camera=-1).shape == (48, 64, 3)  # MuJoCo's free camera
    assert base.render(height=8, width=700).shape == (8, 700, 3)  # beyond the model's 640-pixel buffer
    env.close()


def test_dmc_frames_are_dm_controls_pixels(gl):
    env = make_base_env("walker-walk", seed=0)
    env.reset()
    try:
        np.testing.assert_array_equal(env.render(48, 64), env.physics.render(48, 64, camera_id=0))
    finally:
        env.physics.free()  # dm_control's own GL context, freed before the interpreter's exit
        env.close()


def test_metaworld_video_camera_is_tdmpc2s():
    # TD-MPC2 films Meta-World with "corner2" moved to (0.75, 0.075, 0.7): Meta-World 3's "corner4"
    model = make_base_env("mw-reach", seed=0).sim.model
    corner2, corner4 = model.camera("corner2"), model.camera("corner4")
    np.testing.assert_allclose(corner4.pos, [0.75, 0.075, 0.7])
    np.testing.assert_allclose(corner4.quat, corner2.quat)
    assert corner4.fovy == corner2.fovy


def test_render_rejects_bad_sizes_and_cameras():
    env = make_base_env("cartpole-swingup", seed=0)
    env.reset()
    with pytest.raises(ValueError, match="height must be a positive int"):
        env.render(0, 8)
    with pytest.raises(ValueError, match="width must be a positive int"):
        env.render(8, 8.5)
    with pytest.raises(ValueError, match=r"Unknown camera 'nope'; this model's cameras are \['fixed', 'lookatcart'\]"):
        env.render(8, 8, camera="nope")
    with pytest.raises(ValueError, match="Unknown camera 7"):
        env.render(8, 8, camera=7)


def test_render_without_a_gl_backend_says_what_to_set(monkeypatch):
    import mujoco

    def no_context(*args, **kwargs):
        raise OSError("libEGL.so.1: cannot open shared object file")

    monkeypatch.setattr(mujoco, "Renderer", no_context)
    env = make_base_env("cartpole-swingup", seed=0)
    env.reset()
    with pytest.raises(RuntimeError, match="MUJOCO_GL=egl or MUJOCO_GL=osmesa") as err:
        env.render(8, 8)
    assert "libEGL.so.1" in str(err.value)


def test_torchrl_pixel_render_transform_records_frames(gl):
    from torchrl.record import PixelRenderTransform

    env = make_env("cartpole-swingup", seed=0).append_transform(PixelRenderTransform(height=24, width=32))
    td = env.rollout(3)
    assert td["pixels"].shape == (3, 24, 32, 3) and td["next", "pixels"].shape == (3, 24, 32, 3)
    assert td["pixels"].dtype == torch.uint8
    env.close()


def test_evaluate_record_video_writes_a_metaworld_mp4(gl, tmp_path):
    import importlib.util

    import imageio.v2 as imageio
    from torchrl.envs import StepCounter

    spec = importlib.util.spec_from_file_location("evaluate_recipe", REPO / "recipes" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    def short_episodes():  # 12 agent steps instead of 100: the test stays fast on a CPU renderer
        return make_env("mw-reach", seed=0).append_transform(StepCounter(max_steps=12, step_count_key="video_step"))

    path = evaluate.record_video(short_episodes, lambda td: td.set("action", torch.ones(4)), tmp_path / "policy.mp4",
                                 seed=0, size=(48, 64))
    frames = imageio.mimread(path)
    assert len(frames) == 13  # the reset and 12 agent steps
    assert frames[0].shape == (48, 64, 3)
    assert np.abs(frames[0].astype(int) - frames[-1]).mean() > 1  # the arm moved


# -- the base class's step rules, on a scripted stand-in simulator ------------------------------------------
class _ScriptedEnv(SuiteEnv):
    """Counts simulator steps: observation = [steps so far], reward 1 per step, scripted end / success."""

    def __init__(self, *, action_repeat=2, episode_length=4, terminate_at=None, success_at=(), **kwargs):
        info = TaskInfo("scripted", "test", episode_length, action_repeat, episodic=True, has_success=True)
        self.terminate_at, self.success_at, self.actions, self.steps = terminate_at, set(success_at), [], 0
        super().__init__(info, 1, 2, **kwargs)

    def _sim_reset(self):
        self.steps = 0
        return np.zeros(1)

    def _sim_step(self, action):
        self.steps += 1
        self.actions.append(action.copy())
        terminated, success = self.steps == self.terminate_at, self.steps in self.success_at
        return SimStep(np.array([self.steps]), 1.0, terminated, False, success)

    def _sim_seed(self, seed):
        pass


def _steps(env, n, action=(0.0, 0.0)):
    td = env.reset()
    out = []
    for _ in range(n):
        td = env.step(td.set("action", torch.tensor(action)))["next"]
        out.append(td.clone())
    return out


def test_base_env_specs_pass():
    check_env_specs(_ScriptedEnv())


def test_base_env_repeat_sums_rewards_and_truncates_at_limit():
    env = _ScriptedEnv(action_repeat=2, episode_length=4)
    out = _steps(env, 4)
    assert [td["observation"].item() for td in out] == [2, 4, 6, 8]
    assert all(td["reward"].item() == 2.0 for td in out)
    assert [td["truncated"].item() for td in out] == [False, False, False, True]
    assert not any(td["terminated"].item() for td in out)


def test_base_env_termination_stops_the_repeat_and_wins_over_truncation():
    out = _steps(_ScriptedEnv(action_repeat=2, episode_length=10, terminate_at=3), 2)
    assert out[1]["terminated"].item() and out[1]["done"].item() and not out[1]["truncated"].item()
    assert out[1]["reward"].item() == 1.0  # one simulator step, then the repeat stopped
    last = _steps(_ScriptedEnv(action_repeat=2, episode_length=2, terminate_at=4), 2)[-1]
    assert last["terminated"].item() and not last["truncated"].item()


def test_base_env_success_is_the_last_simulator_step_s_flag():
    """As TD-MPC2's Meta-World wrapper: the flag of the repeat's last simulator step (simulator steps 1-2 make agent
    step 1, 3-4 step 2, ...), not latched."""
    env = _ScriptedEnv(action_repeat=2, episode_length=10, success_at=(3, 6, 7))
    out = _steps(env, 4)
    assert [td["success"].item() for td in out] == [False, False, True, False]
    assert env.reset()["success"].item() is False


def test_base_env_clips_and_rescales_actions():
    env = _ScriptedEnv(action_repeat=1, action_low=np.array([0.0, 10.0]), action_high=np.array([2.0, 30.0]))
    _steps(env, 1, action=(-1.0, 1.0))
    _steps(env, 1, action=(5.0, 0.0))
    np.testing.assert_allclose(env.actions, [[0.0, 30.0], [2.0, 20.0]])
    with pytest.raises(ValueError, match="cannot map"):
        _ScriptedEnv(action_low=np.array([0.0, -np.inf]), action_high=np.array([1.0, 1.0]))
