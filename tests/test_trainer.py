"""Tests of the training stack: stepper, sub-trajectory replay, DreamMPCTrainer (seed phase, checkpoints, resume,
scale-out collectors). Tiny models (32-wide MLPs, 16-dim latents) and runs of a few hundred steps."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import types
import warnings

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModuleBase
from torchrl.checkpoint import GlobalRNGState

from torchrl_dreammpc.checkpoints import CheckpointError
from torchrl_dreammpc.envs import make_env
from torchrl_dreammpc.modules import TDMPC2WorldModel
from torchrl_dreammpc.objectives import TDMPC2Loss
from torchrl_dreammpc.planners import GradientMPCPlanner, PolicyActor
from torchrl_dreammpc.trainers import (
    ConfigMismatchError,
    DreamMPCTrainer,
    EvaluationHook,
    MultiLogger,
    NonFiniteUpdateError,
    SliceReplayBufferTrainer,
    TDMPC2OptimizationStepper,
    load_world_model_from_trainer_checkpoint,
    make_replay_buffer,
    read_eval_csv,
    seed_steps,
    stop_on_signals,
)
from torchrl_dreammpc.trainers.dream_mpc import _UpdateSchedule
from torchrl_dreammpc.trainers.hooks import _episode_metrics

TINY = dict(enc_dim=32, mlp_dim=32, latent_dim=16)
TASK = "cartpole-swingup"  # observation width 5, action width 1, 500-step episodes


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_world_model(obs_dim=5, action_dim=1, seed=0, **overrides) -> TDMPC2WorldModel:
    torch.manual_seed(seed)
    return TDMPC2WorldModel(obs_dim, action_dim, model_size=1, **{**TINY, **overrides})


def random_batch(B=8, H=3, obs_dim=5, action_dim=1) -> TensorDict:
    return TensorDict({
        "observation": torch.randn(B, H, obs_dim),
        "action": torch.rand(B, H, action_dim) * 2 - 1,
        "next": {"observation": torch.randn(B, H, obs_dim), "reward": torch.randn(B, H, 1),
                 "terminated": torch.zeros(B, H, 1, dtype=torch.bool)},
    }, [B, H])


def make_trainer(tmp_path, *, world_model=None, total_frames=150, task=TASK, planner_name="dream_mpc",
                 checkpoints=True, **kwargs) -> DreamMPCTrainer:
    world_model = world_model or tiny_world_model()
    defaults = dict(
        create_env_fn=functools.partial(make_env, task, seed=1),
        world_model=world_model,
        actor=GradientMPCPlanner(world_model),
        total_frames=total_frames,
        batch_size=8,
        seed=1,
        seed_frames=50,
        pretrain_updates=10,
        buffer_capacity=1000,
        eval_interval=0,
        eval_at_start=False,
        log_dir=tmp_path / "run",
        log_interval=50,
        checkpoint_dir=(tmp_path / "run" / "checkpoints") if checkpoints else None,
        checkpoint_interval=50,
        task=task,
        planner_name=planner_name,
        verbose=False,
    )
    defaults.update(kwargs)
    return DreamMPCTrainer(**defaults)


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


def _count_updates(trainer) -> list[int]:
    """A one-element list counting the trainer's optimization steps from now on."""
    updates, step = [0], trainer.optimization_stepper.step

    def counting_step(*args):
        updates[0] += 1
        return step(*args)

    trainer.optimization_stepper.step = counting_step
    return updates


# ---------------------------------------------------------------------------------------------------------
# stepper
# ---------------------------------------------------------------------------------------------------------
def test_stepper_follows_tdmpc2_update_order(monkeypatch):
    wm = tiny_world_model()
    stepper = TDMPC2OptimizationStepper(TDMPC2Loss(wm), grad_clip=20.0, tau=0.01)
    wm_params = {id(p) for p in stepper._wm_params}
    pi_params = {id(p) for p in wm.policy_parameters()}
    assert wm_params.isdisjoint(pi_params) and pi_params

    calls = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *args, **kwargs):
        params = list(params)
        calls.append({
            "ids": {id(p) for p in params},
            "max_norm": max_norm,
            # which gradients exist at the time of the clip tells which backward ran before it
            "wm_grads": any(p.grad is not None for p in stepper._wm_params),
            "pi_grads": any(p.grad is not None for p in wm.policy_parameters()),
        })
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    with torch.no_grad():  # targets away from the online Qs: the soft update's shift (1 % of the gap) is then
        for buffer in wm.target_q_ensemble.buffers():  # far above the tolerance (Adam alone moves ~3e-4)
            buffer.add_(0.5)
    q_before = [p.detach().clone() for p in wm.q_ensemble.parameters()]
    target_before = [b.detach().clone() for b in wm.target_q_ensemble.buffers()]
    pi_before = [p.detach().clone() for p in wm.policy_parameters()]
    metrics = stepper.step(None, random_batch())

    # world model clipped first (its grads only), then the policy, separately, both at 20
    assert [c["ids"] for c in calls] == [wm_params, pi_params]
    assert [c["max_norm"] for c in calls] == [20.0, 20.0]
    assert calls[0]["wm_grads"] and not calls[0]["pi_grads"]
    assert not calls[1]["wm_grads"] and calls[1]["pi_grads"]  # wm grads zeroed before the policy update
    # both optimizers stepped, grads cleared
    assert any(not torch.equal(a, b) for a, b in zip(q_before, wm.q_ensemble.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(pi_before, wm.policy_parameters()))
    assert all(p.grad is None for p in wm.parameters())
    # soft update after the world-model step: target = lerp(target_before, online_after, tau)
    for before, target, online in zip(target_before, wm.target_q_ensemble.buffers(), wm.q_ensemble.parameters()):
        torch.testing.assert_close(target, torch.lerp(before, online.detach(), 0.01))
    assert not wm.training  # acting happens in eval mode
    # detached scalars only, no latents
    assert "latents" not in metrics.keys()
    assert {"loss_consistency", "loss_reward", "loss_value", "loss_pi", "grad_norm", "pi_grad_norm",
            "pi_scale"} <= set(metrics.keys())
    assert all(v.ndim == 0 and not v.requires_grad for v in metrics.values())
    assert stepper.num_updates == 1


def test_stepper_state_holds_optimizers_and_q_scale():
    wm = tiny_world_model()
    stepper = TDMPC2OptimizationStepper(TDMPC2Loss(wm))
    for _ in range(3):
        stepper.step(None, random_batch())
    stepper.policy_loss.scale.value.fill_(3.7)  # (a tiny model's scale stays at its initial 1.0)
    state = stepper.state_dict()
    assert set(state) == {"wm_optim", "pi_optim", "q_scale", "target_updater", "num_updates"}
    assert not any("world_model" in key for key in state["q_scale"])  # weights are not stored twice

    other_wm = tiny_world_model(seed=1)
    other = TDMPC2OptimizationStepper(TDMPC2Loss(other_wm))
    other.load_state_dict(state)
    assert other.num_updates == 3
    assert other.policy_loss.scale.value.item() == pytest.approx(3.7)
    for mine, theirs in zip(stepper.wm_optim.state_dict()["state"].values(),
                            other.wm_optim.state_dict()["state"].values()):
        torch.testing.assert_close(mine["exp_avg"], theirs["exp_avg"])
    assert other.pi_optim.state_dict()["state"][0]["step"] == stepper.pi_optim.state_dict()["state"][0]["step"]


def test_resume_keeps_this_run_s_learning_rates_and_the_checkpoint_s_moments(tmp_path):
    """torch's Optimizer.load_state_dict would bring back the checkpoint's lr: a run resumed with a lower lr (as
    NonFiniteUpdateError suggests) must train with it, and say that it changed."""
    stepper = TDMPC2OptimizationStepper(TDMPC2Loss(tiny_world_model()), lr=3e-4)
    for _ in range(2):
        stepper.step(None, random_batch())
    state = stepper.state_dict()
    resumed = TDMPC2OptimizationStepper(TDMPC2Loss(tiny_world_model(seed=1)), lr=1e-4, enc_lr_scale=0.5)
    with pytest.warns(UserWarning, match=r"this run's are used: world-model optimizer group 0 lr 9e-05 -> 5e-05, "
                                         r"world-model optimizer group 1 lr 0.0003 -> 0.0001, policy optimizer "
                                         r"group 0 lr 0.0003 -> 0.0001$"):
        resumed.load_state_dict(state)
    assert [g["lr"] for g in resumed.wm_optim.param_groups] == [5e-5, 1e-4]
    assert resumed.pi_optim.param_groups[0]["lr"] == 1e-4 and resumed.pi_optim.param_groups[0]["eps"] == 1e-5
    first = next(iter(resumed.wm_optim.state_dict()["state"].values()))
    torch.testing.assert_close(first["exp_avg"], next(iter(state["wm_optim"]["state"].values()))["exp_avg"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings: nothing to say
        TDMPC2OptimizationStepper(TDMPC2Loss(tiny_world_model()), lr=3e-4).load_state_dict(state)

    # through the trainer's checkpoint
    make_trainer(tmp_path, total_frames=100).train()
    trainer = make_trainer(tmp_path, total_frames=150, lr=1e-4)
    with pytest.warns(UserWarning, match="lr 0.0003 -> 0.0001"):
        assert trainer.resume() is not None
    trainer.train()
    assert trainer.optimization_stepper.pi_optim.param_groups[0]["lr"] == 1e-4


def test_stepper_refuses_a_model_moved_after_it_was_built():
    wm = tiny_world_model()
    stepper = TDMPC2OptimizationStepper(TDMPC2Loss(wm))
    assert stepper.device == torch.device("cpu") and stepper.compile_mode is None
    wm.to("meta")  # (no GPU here: a stand-in for a move to CUDA)
    with pytest.raises(RuntimeError, match="The world model is on meta, but this stepper was built for it on cpu"):
        stepper.step(None, random_batch())


def test_non_finite_update_stops_before_the_optimizer_step():
    wm = tiny_world_model()
    stepper = TDMPC2OptimizationStepper(TDMPC2Loss(wm))
    stepper.step(None, random_batch())
    with torch.no_grad():
        wm.reward_head.module.net[0].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in wm.state_dict().items()}
    adam_before = stepper.wm_optim.state_dict()["state"][0]["exp_avg"].clone()
    with pytest.raises(NonFiniteUpdateError, match=r"Non-finite world-model loss \(update 2\): loss_reward = nan, "
                                                   r"grad_norm = nan\. The optimizer step was not taken") as info:
        stepper.step(None, random_batch())
    assert info.value.update == 2 and set(info.value.terms) == {"loss_reward", "grad_norm"}
    # nothing was written: weights, optimizer moments, update count; no gradient left behind; acting mode restored
    for key, value in wm.state_dict().items():
        assert torch.equal(value.nan_to_num(), before[key].nan_to_num()), key
    assert torch.equal(stepper.wm_optim.state_dict()["state"][0]["exp_avg"], adam_before)
    assert stepper.num_updates == 1 and all(p.grad is None for p in wm.parameters()) and not wm.training
    # the opt-out lets it through (and the NaN reaches the weights: what the check prevents)
    TDMPC2OptimizationStepper(TDMPC2Loss(wm), check_finite=False).step(None, random_batch())
    assert not torch.isfinite(wm.q_ensemble.weight_0).all()
    for kwargs, message in ((dict(grad_clip=float("inf")), "grad_clip must be a finite"),
                            (dict(tau=1.5), "tau must be <= 1.0"), (dict(compile="fastest"), "compile must be"),
                            (dict(check_finite="yes"), "check_finite must be true or false")):
        with pytest.raises(ValueError, match=message):
            TDMPC2OptimizationStepper(TDMPC2Loss(tiny_world_model()), **kwargs)


def test_non_finite_update_in_training_names_the_step_and_the_last_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, total_frames=150)

    def poison():  # after the checkpoint of step 100 and the planner's action of step 111, before its update
        if trainer.collected_frames == 111:
            with torch.no_grad():
                trainer.world_model.dynamics.module.net[0].weight.fill_(float("inf"))

    trainer.register_op("pre_optim_steps", poison)
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-000000000100"
    with pytest.raises(NonFiniteUpdateError, match=rf"\(update 71, collected step 111\): loss_consistency = nan.*"
                                                   rf"Last checkpoint: {checkpoint}"):
        trainer.train()
    # the named checkpoint is whole and finite: training can go on from it
    world_model, _ = load_world_model_from_trainer_checkpoint(checkpoint)
    assert all(torch.isfinite(v).all() for v in world_model.state_dict().values())


# ---------------------------------------------------------------------------------------------------------
# replay
# ---------------------------------------------------------------------------------------------------------
def _episodes(lengths, start_id=0, worker=0):
    """Rows of consecutive episodes; ``step`` numbers each row within its episode."""
    rows = []
    for i, length in enumerate(lengths):
        done = torch.zeros(length, 1, dtype=torch.bool)
        done[-1] = True
        rows.append(TensorDict({
            "observation": torch.arange(length, dtype=torch.float32).unsqueeze(-1).expand(length, 5).clone(),
            "action": torch.zeros(length, 1),
            "step": torch.arange(length),
            "worker": torch.full((length,), worker),
            "next": {"observation": torch.zeros(length, 5), "reward": torch.zeros(length, 1), "done": done,
                     "terminated": done.clone(), "truncated": torch.zeros(length, 1, dtype=torch.bool)},
            "collector": {"traj_ids": torch.full((length,), start_id + i)},
        }, [length]))
    return torch.cat(rows)


def _check_slices(sample, H):
    assert sample.shape[1] == H
    ids = sample["collector", "traj_ids"]
    assert (ids == ids[:, :1]).all(), "a slice mixes trajectories"
    steps = sample["step"]
    assert (steps[:, 1:] - steps[:, :-1] == 1).all(), "a slice is not consecutive within its episode"
    done = sample["next", "done"].squeeze(-1)
    assert not done[:, :-1].any(), "a slice continues past an episode end"
    assert (sample["worker"] == sample["worker"][:, :1]).all()


def test_slice_sampler_never_crosses_an_episode_end():
    torch.manual_seed(0)
    H, B = 3, 64
    keys = ("observation", "action", "step", "worker", ("next", "observation"), ("next", "reward"),
            ("next", "done"), ("next", "terminated"), ("next", "truncated"), ("collector", "traj_ids"))
    # short episodes (1 to 7 steps, some shorter than H), wrap-around of a full buffer
    rb = make_replay_buffer(capacity=97, horizon=H, batch_size=B)
    hook = SliceReplayBufferTrainer(rb, H, keys=keys)
    lengths = torch.randint(1, 8, (60,)).tolist()
    data = _episodes(lengths)
    for start in range(0, len(data), 5):  # written in small batches, as a collector does
        hook.extend(data[start:start + 5])
        if len(rb) >= 20:
            _check_slices(hook.sample(), H)
    for _ in range(50):
        _check_slices(hook.sample(), H)
    assert rb.write_count == len(data) > 97  # the buffer wrapped around

    # two workers interleaved step by step ([workers, 1] batches, as MultiSyncCollector yields them at UTD 1):
    # no trajectory is contiguous in storage, the fragmented sampler rebuilds them from (id, step) pairs
    rb = make_replay_buffer(capacity=1000, horizon=H, batch_size=B, fragmented=True, step_key="step")
    hook = SliceReplayBufferTrainer(rb, H, keys=keys)
    a = _episodes(torch.randint(2, 9, (40,)).tolist(), start_id=0, worker=0)
    b = _episodes(torch.randint(2, 9, (40,)).tolist(), start_id=1000, worker=1)
    for t in range(min(len(a), len(b))):
        hook.extend(torch.stack([a[t:t + 1], b[t:t + 1]]))
    for _ in range(50):
        _check_slices(hook.sample(), H)


def test_online_queue_replays_each_window_of_the_stream_once_first(tmp_path):
    """DreamerV3's online queue: rows written one at a time, across episode ends, form consecutive windows of H
    that are sampled once each, oldest first, before uniform windows; an overwritten one is dropped; the queue and
    the unfinished window survive a checkpoint. Without episode ends it queues what TorchRL's StreamingSliceSampler
    (whose queue it is) queues."""
    from torchrl.data import LazyTensorStorage, StreamingSliceSampler, TensorDictReplayBuffer

    from torchrl_dreammpc.trainers.replay import STREAM_KEY, mark_one_stream

    H = 3

    def rows(start, stop, done_at=()):
        done = torch.tensor([[t in done_at] for t in range(start, stop)])
        return mark_one_stream(TensorDict({"step": torch.arange(start, stop), ("next", "done"): done},
                                          [stop - start]))

    rb = make_replay_buffer(capacity=12, horizon=H, batch_size=2, traj_key=STREAM_KEY, online=True)
    for t in range(8):  # episodes end at steps 1 and 4
        rb.extend(rows(t, t + 1, done_at=(1, 4)))
    assert rb.sample()["step"].view(2, H).tolist() == [[0, 1, 2], [3, 4, 5]]  # across the episode ends
    rb.extend(rows(8, 9))
    first = rb.sample()["step"].view(2, H)
    assert first[0].tolist() == [6, 7, 8]  # the one queued window, then a uniform one
    assert first[1].tolist() in [[s, s + 1, s + 2] for s in range(7)]
    rb.extend(rows(9, 11))  # half a window (steps 9, 10) waits across a checkpoint
    rb.dumps(tmp_path / "rb")
    restored = make_replay_buffer(capacity=12, horizon=H, batch_size=2, traj_key=STREAM_KEY, online=True)
    restored.loads(tmp_path / "rb")
    restored.extend(rows(11, 12))
    assert restored.sample()["step"].view(2, H)[0].tolist() == [9, 10, 11]
    # windows overwritten before they were sampled (the buffer wrapped: it holds steps 18 to 29) are dropped
    for t in range(12, 30):
        restored.extend(rows(t, t + 1))
    queued = torch.cat([restored.sample()["step"].view(2, H) for _ in range(2)]).tolist()
    assert queued == [[18, 19, 20], [21, 22, 23], [24, 25, 26], [27, 28, 29]]

    theirs = TensorDictReplayBuffer(storage=LazyTensorStorage(12), batch_size=2 * H, sampler=StreamingSliceSampler(
        slice_len=H, traj_key=STREAM_KEY, init_key=None, truncated_key=None))
    ours = make_replay_buffer(capacity=12, horizon=H, batch_size=2, traj_key=STREAM_KEY, online=True)
    for t in range(9):
        theirs.extend(rows(t, t + 1))
        ours.extend(rows(t, t + 1))
    assert [[w.tolist() for w, _ in rb_.sampler._queued_slices] for rb_ in (theirs, ours)] == [
        [[0, 1, 2], [3, 4, 5], [6, 7, 8]]] * 2
    with pytest.raises(ValueError, match="online=True.*needs traj_key"):
        make_replay_buffer(capacity=12, horizon=H, online=True)


def test_whole_episode_replay_writes_each_episode_when_it_ends(tmp_path):
    """TD-MPC2 adds an episode to its buffer when it ends; with whole_episodes=True so do we (two workers'
    episodes interleaved step by step): an unfinished episode is never sampled, its rows wait and are
    checkpointed, and after a resume they are written at the next write."""
    H = 3
    keys = ("observation", "action", ("next", "observation"), ("next", "reward"), ("next", "done"),
            ("next", "terminated"), ("next", "truncated"), ("collector", "traj_ids"))
    rb = make_replay_buffer(capacity=100, horizon=H, batch_size=8)
    hook = SliceReplayBufferTrainer(rb, H, keys=keys, whole_episodes=True)
    a, b = _episodes([6, 6]), _episodes([4, 9], start_id=10)  # episodes 0, 1 (worker a), 10, 11 (worker b)
    with pytest.raises(RuntimeError, match="no complete episode yet"):
        hook.sample()
    written = []
    for t in range(9):
        hook.extend(torch.stack([a[t:t + 1], b[t:t + 1]]))
        written.append(sorted(set(rb[:]["collector", "traj_ids"].tolist())) if len(rb) else [])
    # episode 10 ends at t=3, episode 0 at t=5; episodes 1 and 11 are unfinished at t=8
    assert written[2] == [] and written[3] == [10] and written[5] == [0, 10] and written[8] == [0, 10]
    assert len(rb) == 10 and sorted(hook.pending) == [1, 11]
    for _ in range(20):
        assert set(hook.sample()["collector", "traj_ids"].unique().tolist()) <= {0, 10}
    # the waiting rows are a checkpoint component; a resumed hook writes them at its first write
    state = hook.pending_state().state_dict()
    assert state["rows"].shape == (3 + 5,)  # 3 rows of episode 1, 5 of episode 11
    resumed = SliceReplayBufferTrainer(rb, H, keys=keys, whole_episodes=True)
    resumed.pending_state().load_state_dict(state)
    resumed.extend(_episodes([2], start_id=20).reshape(-1)[:1])  # a new episode starts after the resume
    assert len(rb) == 18 and sorted(resumed.pending) == [20]

    # in a trainer: 500-step episodes, a checkpoint 50 steps into the second one, then a resume
    wm = tiny_world_model()
    first = make_trainer(tmp_path, world_model=wm, actor=PolicyActor(wm), total_frames=550, seed_frames=500,
                         pretrain_updates=2, replay_whole_episodes=True)
    first.train()
    assert len(first.replay_buffer) == 500 and sum(len(r) for rows in first.replay_hook.pending.values()
                                                    for r in rows) == 50
    second = make_trainer(tmp_path, world_model=tiny_world_model(), total_frames=600, seed_frames=500,
                          pretrain_updates=2, replay_whole_episodes=True)
    second.resume()
    assert len(second.replay_buffer) == 500 and len(second.replay_hook._stale) == 50
    second.train()
    assert len(second.replay_buffer) == 550  # the 50 rows that waited, written as they were
    # (checkpoints every 50 steps: the first ones came before any episode had ended, from an empty buffer)


def test_replay_refuses_batches_without_a_stored_key():
    rb = make_replay_buffer(capacity=100, horizon=3, batch_size=4)
    hook = SliceReplayBufferTrainer(rb, 3)
    batch = _episodes([10])
    with pytest.raises(KeyError, match=r"lacks \[\('next', 'terminated'\)\]"):
        hook.extend(batch.exclude(("next", "terminated")))
    assert len(rb) == 0  # nothing half-written
    hook.extend(batch)
    assert len(rb) == 10


# ---------------------------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------------------------
def test_collector_acts_with_the_trained_modules(tmp_path):
    trainer = make_trainer(tmp_path, checkpoints=False)
    # the single-process collector keeps the actor object: planning reads the weights the stepper updates
    assert trainer.collector.policy is trainer.actor
    planner_params = dict(trainer.collector.policy.named_parameters())
    for name, param in trainer.world_model.named_parameters():
        assert planner_params[f"world_model.{name}"] is param
    # ... so no UpdateWeights hook (it would copy the weights onto themselves every step)
    assert "update_weights" not in trainer._modules


@pytest.mark.parametrize("utd_ratio, after_seed", [(1.0, 50), (0.5, 25), (2.0, 100)])
def test_seed_phase_pretraining_then_utd_updates_per_step(tmp_path, utd_ratio, after_seed):
    trainer = make_trainer(tmp_path, total_frames=100, seed_frames=50, pretrain_updates=10, checkpoints=False,
                           utd_ratio=utd_ratio)
    planner_calls = _count_calls(trainer.actor)
    updates = _count_updates(trainer)
    trainer.train()
    assert trainer.collected_frames == 100
    assert planner_calls[0] == 100 - 50  # random actions during the seed phase, the planner afterwards
    assert updates[0] == trainer._optim_count == 10 + after_seed  # pre-training burst, then utd_ratio per step
    assert len(trainer.replay_buffer) == 100
    assert seed_steps(500) == 2500 and seed_steps(100) == 1000  # TD-MPC2: max(1000, 5 * episode_length)


@pytest.mark.parametrize("stops, done_before_last_resume", [
    ([("update", 10)], 16),  # inside the burst: the slice in progress (8 + 8) finishes, no more
    ([("step", 40)], 0),  # requested while the seed phase's last step is collected: the burst never starts
    ([("update", 10), ("update", 5)], 24),  # and again inside the resumed rest (16 + 8)
])
def test_a_stop_inside_the_pretraining_burst_checkpoints_and_the_resumed_run_does_the_rest(
        tmp_path, stops, done_before_last_resume):
    """TD-MPC2's burst is as long as the seed phase (5,000 updates, ~10 min on a CPU core for HumanoidBench): a
    stop request inside it ends it at the next slice, and the resumed run does what is left before anything else,
    with the updates of the steps it stopped at, so that the run's update count is the uninterrupted one's. The
    resumed run finishes the burst before it collects a step, and takes the evaluation and snapshot then, named
    by the step that ended the seed phase, as the uninterrupted run does. No evaluation or snapshot is taken of
    the half pre-trained model. The burst's losses are logged once, over all of its updates."""
    burst_losses = []  # loss_pi of every burst update, in whichever run it happened

    def trainer(seed, stop=None):
        wm = tiny_world_model(seed=seed)
        made = make_trainer(tmp_path, world_model=wm, total_frames=100, seed_frames=40, pretrain_updates=30,
                            eval_interval=40, eval_episodes=1, eval_actors={"policy": PolicyActor(wm)},
                            snapshot_interval=40, log_interval=1)
        made.PRETRAIN_SLICE = 8
        step, flags = made.optimization_stepper.step, []

        def counting_step(*args):
            flags.append(made.pretraining)
            if stop == ("update", len(flags)):
                made.request_stop("preempted")  # as SIGTERM does (stop_on_signals)
            losses = step(*args)
            if made.pretraining:
                burst_losses.append(float(losses["loss_pi"]))
            return losses

        def stop_at_step(batch):
            if stop == ("step", made.collected_frames):
                made.request_stop("preempted")

        made.optimization_stepper.step = counting_step
        made.register_op("pre_steps_log", stop_at_step)  # after the step is counted, before its updates
        # the burst's updates left whenever the planner acts (after the seed phase: the collector's steps)
        made.acted_with_left = []
        made.actor.register_forward_pre_hook(
            lambda *args: made.acted_with_left.append(made.update_schedule.pretrain_left))
        return made, flags

    run = tmp_path / "run"
    for i, stop in enumerate(stops):
        stopped, _ = trainer(i, stop)
        stopped.resume()
        stopped.train()
        # no step is collected with the half pre-trained model, nor by a run stopped again inside the rest
        assert stopped.collected_frames == 40 and stopped.pretrain_pending and not stopped.acted_with_left
        assert stopped.update_schedule.pretrain_left > 0
    assert stopped._optim_count == done_before_last_resume
    assert stopped.update_schedule.pretrain_left == 30 - done_before_last_resume
    # nothing of the half pre-trained model: no evaluation row, no snapshot at the seed phase's end
    assert not (run / "eval.csv").exists() or [s for s, _ in read_eval_csv(run / "eval.csv")] == []
    assert not list((run / "snapshots").glob("step_*.pt")) or sorted(
        p.name for p in (run / "snapshots").glob("step_*.pt")) == ["step_00000000.pt"]

    last, flags = trainer(9)
    last.resume()
    assert last.update_schedule.pretrain_left == 30 - done_before_last_resume
    last.train()
    assert last.collected_frames == 100 and last.update_schedule.pretrain_left == 0
    # the rest of the burst (flagged as pre-training) first, then one update per step after the seed phase
    assert flags == [True] * (30 - done_before_last_resume) + [False] * 60
    assert last._optim_count == 30 + 60
    # every step the resumed run collected was collected by the pre-trained model (its training steps; the
    # evaluations' planner calls come after the burst too)
    assert last.acted_with_left and set(last.acted_with_left) == {0}
    # the evaluation and the snapshot waited for the burst's end and are named by the step that ended the seed
    # phase (40), as in the uninterrupted run, however often the burst was stopped
    assert [s for s, _ in read_eval_csv(run / "eval.csv")] == [40, 80, 100]
    assert sorted(int(p.stem.split("_")[1]) for p in (run / "snapshots").glob("step_*.pt")) == [0, 40, 80]
    # the burst's losses: one log entry, with its update count (TorchRL logs each optim_steps call, and keeps one
    # entry per key and log_interval: the slices, all at one step, would have logged the first slice's alone),
    # the mean over all of its updates, however often it was stopped (the part before a stop waits in the
    # checkpoint)
    logged = [row.split(",") for row in (run / "csv" / "scalars" / "optim_steps.csv").read_text().split()]
    assert logged[0] == ["40", "30.0"] and logged[1][0] != "40"
    loss_pi = [row.split(",") for row in (run / "csv" / "scalars" / "loss_pi.csv").read_text().split()]
    assert len(burst_losses) == 30 and loss_pi[0][0] == "40" and loss_pi[1][0] != "40"
    assert float(loss_pi[0][1]) == pytest.approx(sum(burst_losses) / 30, rel=1e-5)


@pytest.mark.parametrize("killed", ["after_setup", "in_its_checkpoint"])
def test_a_run_killed_after_finishing_a_resumed_burst_neither_redoes_nor_duplicates_it(tmp_path, killed):
    """The resumed run replaces the checkpoint of the stop (burst pending) by one with the burst done and the step
    evaluated: killed after that, the next run redoes nothing. Killed before it was written, the next run resumes
    with the burst pending and drops the evaluation rows of the killed attempt at that step (written after the
    checkpoint it resumes from), so eval.csv and the CSV scalars hold the step once."""
    def trainer(seed):
        wm = tiny_world_model(seed=seed)
        made = make_trainer(tmp_path, world_model=wm, total_frames=100, seed_frames=40, pretrain_updates=30,
                            eval_interval=40, eval_episodes=1, eval_actors={"policy": PolicyActor(wm)},
                            snapshot_interval=40, log_interval=1)
        made.PRETRAIN_SLICE = 8
        return made

    stopped = trainer(0)
    step = stopped.optimization_stepper.step

    def stop_at_the_tenth_update(*args):
        if stopped._optim_count == 10:
            stopped.request_stop("preempted")
        return step(*args)

    stopped.optimization_stepper.step = stop_at_the_tenth_update
    stopped.train()
    assert stopped.pretrain_pending and stopped.collected_frames == 40

    class Killed(Exception):
        pass

    def kill(*args):
        raise Killed

    doomed = trainer(1)
    doomed.resume()
    if killed == "after_setup":
        doomed.register_op("pre_steps_log", kill)  # before the first step after the resume is counted
    else:
        doomed._save_trainer = kill  # the checkpoint that replaces the stop's
    with pytest.raises(Killed):
        doomed.train()
    run = tmp_path / "run"
    assert [s for s, _ in read_eval_csv(run / "eval.csv")] == [40]

    last = trainer(2)
    last.resume()
    assert last.pretrain_pending == (killed == "in_its_checkpoint")
    updates = _count_updates(last)
    last.train()
    assert last._optim_count == 30 + 60  # the uninterrupted run's count either way
    assert updates[0] == (60 if killed == "after_setup" else 30 - 16 + 60)
    assert [s for s, _ in read_eval_csv(run / "eval.csv")] == [40, 80, 100]
    assert [row.split(",")[0] for row in (run / "csv" / "scalars" / "eval" / "return.csv").read_text().split()] == [
        "40", "80", "100"]


def test_a_snapshot_due_when_a_batch_ended_the_seed_phase_is_taken_after_a_stopped_burst(tmp_path):
    """Batches of 6 steps: the one that ends the seed phase (36 -> 42) crosses the multiple 38 of the snapshot
    interval; stopped inside its burst, the resumed run finishes the burst and takes that snapshot, named 42 as in
    the uninterrupted run, before it collects its next batch."""
    def trainer(name, stop_at=None):
        made = make_trainer(tmp_path / name, total_frames=66, seed_frames=40, pretrain_updates=30,
                            frames_per_batch=6, snapshot_interval=19)
        made.PRETRAIN_SLICE, step, count = 8, made.optimization_stepper.step, [0]

        def counting_step(*args):
            count[0] += 1
            if count[0] == stop_at:
                made.request_stop("preempted")
            return step(*args)

        made.optimization_stepper.step = counting_step
        return made

    def taken(name):
        return sorted(int(p.stem.split("_")[1]) for p in (tmp_path / name / "run" / "snapshots").glob("step_*.pt"))

    trainer("whole").train()
    assert taken("whole") == [0, 24, 42, 60]
    stopped = trainer("stopped", stop_at=10)
    stopped.train()
    assert stopped.collected_frames == 42 and taken("stopped") == [0, 24]
    resumed = trainer("stopped")
    resumed.resume()
    resumed.train()
    assert taken("stopped") == taken("whole")  # the burst finished before the next batch: the snapshot of step 42


def test_a_checkpoint_from_before_the_burst_was_recorded_infers_it_from_the_update_count():
    schedule = _UpdateSchedule(1.0, pretrain_updates=30)
    schedule.load_state_dict({"utd_ratio": 1.0, "credit": 0.25})  # the state an older checkpoint holds
    assert schedule.pretrain_left is None and schedule.credit == 0.25
    assert _UpdateSchedule.infer_pretrain_left(30, optim_count=0) == 30  # stopped before the burst
    assert _UpdateSchedule.infer_pretrain_left(30, optim_count=31) == 0  # the old burst ran whole
    schedule.load_state_dict(_UpdateSchedule(1.0, pretrain_updates=30).state_dict())
    assert schedule.pretrain_left == 30


def test_train_checkpoint_resume_restores_everything(tmp_path):
    wm = tiny_world_model()
    # evaluated with the policy prior: cheap, and what is checked here is the evaluation schedule
    first = make_trainer(tmp_path, world_model=wm, total_frames=150, eval_interval=100, eval_episodes=1,
                         eval_at_start=True, eval_actors={"policy": PolicyActor(wm)})
    # Early on TD-MPC2's Q scale sits at its floor of 1: start it elsewhere so that restoring it is visible.
    first.optimization_stepper.policy_loss.scale.value.fill_(3.7)
    first.train()
    run = tmp_path / "run"
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-000000000050", "checkpoint-000000000100", "checkpoint-000000000150"]
    manifest = json.loads((run / "checkpoints" / checkpoints[-1] / "manifest.json").read_text())
    assert {"rng", "replay_buffer", "loss_module", "trainer_state", "collector", "trainer_module.optimization_stepper",
            "trainer_module.evaluation", "logger"} <= set(manifest["components"])
    fingerprint = manifest["metadata"]["fingerprint"]
    assert (fingerprint["task"], fingerprint["model_size"], fingerprint["obs_dim"], fingerprint["action_dim"],
            fingerprint["planner"]) == (TASK, 1, 5, 1, "dream_mpc")
    assert [step for step, _ in read_eval_csv(run / "eval.csv")] == [0, 100, 150]  # step 0 first, as TD-MPC2
    assert not first.world_model.training  # evaluation leaves the model in eval mode (Q dropout off) for acting
    rng_at_end = GlobalRNGState().state_dict()["torch_cpu"]

    wm2 = tiny_world_model(seed=7)
    second = make_trainer(tmp_path, world_model=wm2, total_frames=200, eval_interval=100, eval_episodes=1,
                          eval_at_start=True, eval_actors={"policy": PolicyActor(wm2)})
    assert second.resume() == run / "checkpoints" / checkpoints[-1]
    # model, optimizers, Q scale, buffer, counters, RNG
    for a, b in zip(first.world_model.state_dict().values(), second.world_model.state_dict().values()):
        torch.testing.assert_close(a, b)
    for opt_a, opt_b in ((first.optimization_stepper.wm_optim, second.optimization_stepper.wm_optim),
                         (first.optimization_stepper.pi_optim, second.optimization_stepper.pi_optim)):
        for sa, sb in zip(opt_a.state_dict()["state"].values(), opt_b.state_dict()["state"].values()):
            torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"])
    torch.testing.assert_close(second.optimization_stepper.policy_loss.scale.value,
                               first.optimization_stepper.policy_loss.scale.value)
    assert 1.0 < first.optimization_stepper.policy_loss.scale.value.item() < 3.7  # updated by every update
    assert len(second.replay_buffer) == 150
    torch.testing.assert_close(second.replay_buffer[:]["observation"], first.replay_buffer[:]["observation"])
    assert (second.collected_frames, second._optim_count) == (150, first._optim_count)
    assert second.collector._frames == 150
    assert torch.equal(torch.random.get_rng_state(), rng_at_end)
    # the resumed run ends at the requested number of steps, with new trajectory ids after the old ones
    second.train()
    assert second.collected_frames == 200 and second._optim_count == 10 + 200 - 50
    ids = second.replay_buffer[:]["collector", "traj_ids"]
    assert ids[150:].min() > ids[:150].max()
    assert [step for step, _ in read_eval_csv(run / "eval.csv")] == [0, 100, 150, 200]  # no second step 0


def test_evaluation_leaves_the_training_run_as_it_would_have_been(tmp_path):
    """Evaluations inside a training run, of the training planner itself (the default eval actor), change nothing in
    the training: the same transitions are collected and the same model learned, bit for bit, as without them. The
    evaluation runs on a fork of torch's RNG (Dream-MPC draws its candidates from it) and plans from a warm start of
    its own (the training episode in progress goes on from its own previous plan)."""
    from torchrl_dreammpc.trainers import cap_episode_length

    runs = {}
    for name, evaluated in (("plain", False), ("evaluated", True)):
        wm = tiny_world_model()
        trainer = make_trainer(tmp_path / name, world_model=wm, total_frames=120, checkpoints=False,
                               eval_interval=40 if evaluated else 0, eval_episodes=1, eval_at_start=evaluated,
                               create_eval_env_fn=lambda: cap_episode_length(make_env(TASK, seed=1), 7))
        trainer.train()
        evaluation = getattr(trainer, "evaluation", None)
        runs[name] = (trainer, 0 if evaluation is None else len(evaluation.history))
    (plain, _), (evaluated, evaluations) = runs["plain"], runs["evaluated"]
    assert evaluations == 4  # steps 0, 40, 80, 120: the check is not vacuous
    torch.testing.assert_close(evaluated.replay_buffer[:]["action"], plain.replay_buffer[:]["action"], rtol=0, atol=0)
    for a, b in zip(evaluated.world_model.state_dict().values(), plain.world_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_restart_without_a_checkpoint_rewrites_the_logs_and_keeps_a_copy(tmp_path):
    """A run killed before its first checkpoint and started again in its directory (``resume()`` finds nothing)
    starts afresh: ``eval.csv`` gets step 0 once, not once per attempt; the earlier attempt's rows are copied aside."""
    def trainer(wm):
        return make_trainer(tmp_path, world_model=wm, total_frames=60, eval_interval=50, eval_episodes=1,
                            eval_at_start=True, eval_actors={"policy": PolicyActor(wm)}, checkpoint_interval=10_000)

    wm = tiny_world_model()
    first = trainer(wm)
    first.train()  # as if killed before a checkpoint: delete the final one the Trainer wrote at the end
    run = tmp_path / "run"
    for checkpoint in (run / "checkpoints").iterdir():
        shutil.rmtree(checkpoint)
    first_rows = read_eval_csv(run / "eval.csv")
    assert [step for step, _ in first_rows] == [0, 50, 60]
    scalars = sorted((run / "csv").rglob("*.csv"))
    assert scalars, "the CSV logger wrote no scalars"

    wm2 = tiny_world_model()
    second = trainer(wm2)
    assert second.resume() is None
    assert read_eval_csv(run / "eval.csv") == []  # the attempt's rows are gone from the curve ...
    assert read_eval_csv(run / "eval.csv.before-restart") == first_rows  # ... but kept beside it
    for file in scalars:  # the CSV scalars likewise
        assert file.read_text().strip() == "" and file.with_name(file.name + ".before-restart").read_text().strip()
    second.train()
    assert [step for step, _ in read_eval_csv(run / "eval.csv")] == [0, 50, 60]
    # a second restart keeps the second attempt's rows too, under a new name
    for checkpoint in (run / "checkpoints").iterdir():
        shutil.rmtree(checkpoint)
    assert trainer(tiny_world_model()).resume() is None
    assert [step for step, _ in read_eval_csv(run / "eval.csv.before-restart-2")] == [0, 50, 60]
    assert read_eval_csv(run / "eval.csv") == []


def test_sigterm_checkpoints_the_step_reached_and_the_run_resumes_from_it(tmp_path):
    """A preempted run (SIGTERM, twice: a process-group kill and a forwarding parent) stops at the next step with a
    checkpoint of that step, between two periodic ones, and without an evaluation there; resumed, it goes on from
    that step, and the episode cut by the stop is no trajectory that continues after the resume."""
    def trainer(wm, total_frames):
        return make_trainer(tmp_path, world_model=wm, total_frames=total_frames, eval_interval=100,
                            eval_episodes=1, eval_at_start=True, eval_actors={"policy": PolicyActor(wm)})

    first = trainer(tiny_world_model(), 150)
    stop_at = 73  # after the checkpoint of step 50, before the one of step 100

    def preempt():
        if first.collected_frames == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    first.register_op("post_steps", preempt)
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(first) as received:
        first.train()
    assert received == [signal.SIGTERM, signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is gone after the block
    run = tmp_path / "run"
    assert first.collected_frames == stop_at
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint-000000000050", f"checkpoint-{stop_at:012d}"]
    assert [step for step, _ in read_eval_csv(run / "eval.csv")] == [0]  # no evaluation at the stop step

    wm2 = tiny_world_model(seed=3)
    second = trainer(wm2, 150)
    assert second.resume() == run / "checkpoints" / f"checkpoint-{stop_at:012d}"
    for a, b in zip(first.world_model.state_dict().values(), wm2.state_dict().values()):
        torch.testing.assert_close(a, b)
    second.train()
    assert second.collected_frames == 150
    assert [step for step, _ in read_eval_csv(run / "eval.csv")] == [0, 100, 150]
    stored = second.replay_buffer[:]
    ids = stored["collector", "traj_ids"]
    assert not stored["next", "done"][stop_at - 1].any()  # the stop cut an episode (cartpole's are 500 steps) ...
    assert ids[stop_at:].min() > ids[:stop_at].max()  # ... and the resumed steps are another trajectory


def test_sigint_twice_stops_at_once():
    """Ctrl-C once asks for the graceful stop; a second Ctrl-C raises KeyboardInterrupt as Python does."""
    class Recorder:
        reasons = []

        def request_stop(self, reason=None):
            self.reasons.append(reason)

    trainer = Recorder()
    # Python's own Ctrl-C handler, whatever an earlier test (e.g. one that started Ray) left installed
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with stop_on_signals(trainer) as received:
                os.kill(os.getpid(), signal.SIGINT)
                assert trainer.reasons == ["received SIGINT"] and received == [signal.SIGINT]
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_resume_refuses_another_task_or_model_size_before_loading(tmp_path):
    make_trainer(tmp_path, total_frames=60).train()
    # same observation/action widths, other task
    other_task = make_trainer(tmp_path, total_frames=100, task="cartpole-balance")
    weights = {k: v.clone() for k, v in other_task.world_model.state_dict().items()}
    with pytest.raises(ConfigMismatchError, match=r"task: checkpoint has 'cartpole-swingup', this run has "
                                                  r"'cartpole-balance'"):
        other_task.resume()
    # nothing was loaded
    assert all(torch.equal(weights[k], v) for k, v in other_task.world_model.state_dict().items())
    assert other_task.collected_frames == 0 and len(other_task.replay_buffer) == 0

    bigger = TDMPC2WorldModel(5, 1, model_size=5, **TINY)
    with pytest.raises(ConfigMismatchError, match=r"model_size: checkpoint has 1, this run has 5"):
        make_trainer(tmp_path, world_model=bigger, total_frames=100).resume()
    wider = tiny_world_model(latent_dim=24)
    with pytest.raises(ConfigMismatchError, match=r"world_model.latent_dim: checkpoint has 16, this run has 24"):
        make_trainer(tmp_path, world_model=wider, total_frames=100).resume()
    with pytest.raises(ConfigMismatchError, match=r"planner: checkpoint has 'dream_mpc', this run has 'policy'"):
        make_trainer(tmp_path, total_frames=100, planner_name="policy").resume()


def test_resume_with_another_eval_interval_follows_the_new_one(tmp_path):
    """The evaluation schedule restored from a checkpoint is re-derived from this run's eval_interval (the old
    next_eval would evaluate once more on the old schedule; with eval_interval=0 it divided by zero)."""
    wm = tiny_world_model()
    common = dict(world_model=wm, actor=PolicyActor(wm), eval_episodes=1, eval_at_start=False)
    make_trainer(tmp_path, total_frames=100, eval_interval=50, **common).train()
    assert [step for step, _ in read_eval_csv(tmp_path / "run" / "eval.csv")] == [50, 100]
    trainer = make_trainer(tmp_path, total_frames=150, eval_interval=40, **common)
    trainer.resume()
    trainer.train()
    assert [step for step, _ in read_eval_csv(tmp_path / "run" / "eval.csv")] == [50, 100, 120, 150]
    trainer = make_trainer(tmp_path, total_frames=200, eval_interval=0, eval_actors={"policy": PolicyActor(wm)},
                           **common)
    trainer.resume()
    trainer.train()  # no evaluation any more
    assert trainer.collected_frames == 200
    assert [step for step, _ in read_eval_csv(tmp_path / "run" / "eval.csv")] == [50, 100, 120, 150]


def test_progress_bar_of_a_resumed_run_starts_at_its_step(tmp_path, capsys):
    wm = tiny_world_model()
    make_trainer(tmp_path, world_model=wm, actor=PolicyActor(wm), total_frames=100).train()
    trainer = make_trainer(tmp_path, world_model=wm, actor=PolicyActor(wm), total_frames=150, progress_bar=True)
    trainer.resume()
    trainer.train()
    assert trainer._pbar.n == 150 and trainer._pbar.total == 150
    # TorchRL's bar opens at 0/150 and is replaced at setup by one at 100/150: no count between (0 then 1, 2...)
    bar_counts = [int(n) for n in re.findall(r"(\d+)/150", capsys.readouterr().err)]
    assert 100 in bar_counts and all(n == 0 or n >= 100 for n in bar_counts), bar_counts


def test_resume_uses_last_complete_checkpoint_only(tmp_path):
    make_trainer(tmp_path, total_frames=100).train()
    directory = tmp_path / "run" / "checkpoints"
    # what a kill during a save leaves: a staging directory (not yet renamed into place) ...
    stage = directory / ".checkpoint-000000000150.stage-0123456789abcdef"
    (stage / "components").mkdir(parents=True)
    (stage / "components" / "partial.bin").write_bytes(b"\0" * 10)
    # ... and, whatever the cause, a checkpoint-looking directory without a manifest
    (directory / "checkpoint-000000000200").mkdir()
    trainer = make_trainer(tmp_path, total_frames=150)
    assert trainer.resume() == directory / "checkpoint-000000000100"
    assert trainer.collected_frames == 100
    assert not stage.exists()  # stale staging removed
    trainer.train()
    assert trainer.collected_frames == 150


def test_trainer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="total_frames=50 does not exceed the seed phase"):
        make_trainer(tmp_path, total_frames=50, seed_frames=50)
    with pytest.raises(ValueError, match="lr must be > 0.0, got -0.001"):
        make_trainer(tmp_path, lr=-1e-3)
    with pytest.raises(ValueError, match="utd_ratio must be a finite real number, got inf"):
        make_trainer(tmp_path, utd_ratio=float("inf"))
    with pytest.raises(ValueError, match="buffer_capacity must be a positive integer, got 0"):
        make_trainer(tmp_path, buffer_capacity=0)
    with pytest.raises(ValueError, match="buffer_capacity=2 cannot hold one sub-trajectory of horizon=3"):
        make_trainer(tmp_path, buffer_capacity=2)
    # the actor must plan over the model being trained (another one would never be updated)
    wm, other = tiny_world_model(), tiny_world_model(seed=1)
    with pytest.raises(ValueError, match=r"actor \(GradientMPCPlanner\) must act through the world model being "
                                         r"trained: it plans over another TDMPC2WorldModel instance"):
        make_trainer(tmp_path, world_model=wm, actor=GradientMPCPlanner(other))
    with pytest.raises(ValueError, match=r"eval_actors\['policy'\] \(PolicyActor\) must act through"):
        make_trainer(tmp_path, world_model=wm, actor=GradientMPCPlanner(wm), eval_actors={"policy": PolicyActor(other)})
    with pytest.raises(ValueError, match="the world model is not among its submodules"):
        make_trainer(tmp_path, world_model=wm, actor=torch.nn.Linear(5, 1))
    with pytest.raises(ValueError, match="observation width 5 and action width 1.*observation width 6"):
        make_trainer(tmp_path, world_model=tiny_world_model(obs_dim=6))
    with pytest.raises(NotImplementedError, match="learner_backend='ray'"):
        make_trainer(tmp_path, learner_backend="ray")


def test_multi_worker_collector_collects(tmp_path):
    wm = tiny_world_model()
    trainer = make_trainer(tmp_path, world_model=wm, actor=PolicyActor(wm), total_frames=60, seed_frames=20,
                           pretrain_updates=2, num_workers=2, checkpoint_interval=1000)
    assert type(trainer.collector).__name__ == "MultiSyncCollector"
    assert "update_weights" in trainer._modules  # worker processes get the weights pushed after each batch
    synced = {}

    def check_worker_weights():  # post_steps op registered after UpdateWeights: runs right after the push
        if trainer._optim_count > 2 and not synced:
            worker = trainer.collector.state_dict()["worker0"]["policy_state_dict"]
            name, param = next(iter(wm.encoder.named_parameters()))
            synced["equal"] = torch.equal(worker[f"world_model.encoder.{name}"], param.detach())

    trainer.register_op("post_steps", check_worker_weights)
    trainer.train()
    assert synced == {"equal": True}  # the worker acts with the weights of the last update
    assert trainer.collected_frames >= 60
    assert (tmp_path / "run" / "checkpoints" / f"checkpoint-{trainer.collected_frames:012d}").is_dir()
    data = trainer.replay_buffer[:]
    assert len(data) == trainer.collected_frames
    # rows alternate between the workers batch by batch; each worker has its own trajectory ids
    ids = data["collector", "traj_ids"].reshape(-1, 2)  # [batches, workers] with frames_per_batch=1 per worker
    assert set(ids[:, 0].tolist()).isdisjoint(ids[:, 1].tolist())
    assert trainer._optim_count > 2


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="Ray is not installed (optional extra: pip install 'torchrl_dreammpc[ray]')")
def test_ray_collector_collects(tmp_path, monkeypatch):
    import datetime

    import ray
    import torchrl.weight_update._ray as ray_weight_sync

    # TorchRL's weight-sync rendezvous waits 60 s for the Ray workers to start; on a loaded 2-core machine
    # (a training run beside the tests) starting them takes longer, which is not what this test checks.
    monkeypatch.setattr(ray_weight_sync, "_DIST_TIMEOUT", datetime.timedelta(seconds=600))
    wm = tiny_world_model()
    trainer = make_trainer(tmp_path, world_model=wm, actor=PolicyActor(wm), total_frames=40, seed_frames=20,
                           pretrain_updates=2, collector_backend="ray", checkpoints=False, log_dir=None,
                           ray_init_config={"num_cpus": 2, "include_dashboard": False})
    try:
        assert type(trainer.collector).__name__ == "RayCollector"
        trainer.train()
        assert trainer.collected_frames >= 40
        assert len(trainer.replay_buffer) == trainer.collected_frames
        assert trainer._optim_count > 2
    finally:
        ray.shutdown()


def test_compiled_update_matches_eager_after_three_steps():
    """The compiled update computes the same thing: same parameters after 3 updates from the same state."""
    import copy

    import torch._inductor.config as inductor_config
    from tensordict import TensorDict

    from torchrl_dreammpc.modules import TDMPC2WorldModel
    from torchrl_dreammpc.objectives import TDMPC2Loss
    from torchrl_dreammpc.trainers import TDMPC2OptimizationStepper

    torch.manual_seed(0)
    wm_eager = TDMPC2WorldModel(5, 1, model_size=1, enc_dim=32, mlp_dim=32, latent_dim=16)  # with Q dropout
    wm_comp = copy.deepcopy(wm_eager)
    g = torch.Generator().manual_seed(1)
    B, H = 16, 3
    batches = [TensorDict({"observation": torch.randn(B, H, 5, generator=g),
                           "action": torch.rand(B, H, 1, generator=g) * 2 - 1,
                           "next": {"observation": torch.randn(B, H, 5, generator=g),
                                    "reward": torch.randn(B, H, 1, generator=g),
                                    "terminated": torch.zeros(B, H, 1, dtype=torch.bool)}}, [B, H])
               for _ in range(3)]
    eager = TDMPC2OptimizationStepper(TDMPC2Loss(wm_eager))
    # default compile mode: the inductor default (max-autotune would take minutes to tune in a test)
    compiled = TDMPC2OptimizationStepper(TDMPC2Loss(wm_comp), compile="default")
    # inductor draws its own random numbers unless told to fall back to ATen's: needed for the same policy samples
    with inductor_config.patch(fallback_random=True):
        for batch in batches:
            torch.manual_seed(123)
            m_e = eager.step(None, batch.clone())
            torch.manual_seed(123)
            m_c = compiled.step(None, batch.clone())
            torch.testing.assert_close(m_c["loss_value"], m_e["loss_value"], rtol=1e-4, atol=1e-5)
    for (name, p_e), p_c in zip(wm_eager.state_dict().items(), wm_comp.state_dict().values()):
        torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # bad input still raises the eager validation error before the compiled call
    bad = batches[0].clone()
    bad["observation"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        compiled.step(None, bad)


def test_algorithm_is_in_the_fingerprint_and_older_checkpoints_count_as_tdmpc2(tmp_path):
    from torchrl.checkpoint import Checkpoint

    make_trainer(tmp_path, total_frames=60).train()
    latest = make_trainer(tmp_path, total_frames=100).latest_checkpoint()
    manifest_path = latest / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert Checkpoint.manifest(latest)["metadata"]["fingerprint"]["algorithm"] == "tdmpc2"
    # a checkpoint written before the algorithm entry existed resumes as a TD-MPC2 run
    del manifest["metadata"]["fingerprint"]["algorithm"]
    manifest_path.write_text(json.dumps(manifest))
    trainer = make_trainer(tmp_path, total_frames=100)
    assert trainer.resume() == latest and trainer.collected_frames == 60
    with pytest.raises(ValueError, match="algorithm must be one of"):
        make_trainer(tmp_path, algorithm="sac")


def test_snapshots_every_interval_survive_rotation_and_resume(tmp_path):
    from torchrl_dreammpc.checkpoints import load_world_model

    trainer = make_trainer(tmp_path, total_frames=100, keep_checkpoints=1, snapshot_interval=50)
    trainer.train()
    snapshots = tmp_path / "run" / "snapshots"
    assert sorted(p.name for p in snapshots.glob("*.pt")) == ["step_00000000.pt", "step_00000050.pt",
                                                              "step_00000100.pt"]
    assert len(list((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))) == 1  # rotation kept one
    final = load_world_model(snapshots / "step_00000100.pt")
    assert all(torch.equal(final.state_dict()[k], v) for k, v in trainer.world_model.state_dict().items())
    first = snapshots.joinpath("step_00000050.pt").read_bytes()
    resumed = make_trainer(tmp_path, total_frames=150, keep_checkpoints=1, snapshot_interval=50)
    resumed.resume()
    resumed.train()
    assert snapshots.joinpath("step_00000050.pt").read_bytes() == first  # never overwritten
    assert snapshots.joinpath("step_00000150.pt").exists()
    with pytest.raises(ValueError, match="snapshot_interval must be an integer >= 0"):
        make_trainer(tmp_path, snapshot_interval=-5)


def test_snapshots_when_batches_jump_over_the_interval(tmp_path):
    """3 frames per batch: the step count passes 50 at 51 and 100 at 102; a resumed run goes on from its step."""
    from types import SimpleNamespace

    from torchrl_dreammpc.trainers import WorldModelSnapshots

    def play(hook, steps):
        hook._trainer = trainer = SimpleNamespace(collected_frames=steps[0])
        hook.initial()
        for step in steps[1:]:
            trainer.collected_frames = step
            hook()

    play(WorldModelSnapshots(tiny_world_model(), tmp_path, 50), list(range(0, 130, 3)))
    play(WorldModelSnapshots(tiny_world_model(), tmp_path, 50), list(range(129, 160, 3)))
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["step_00000000.pt", "step_00000051.pt",
                                                             "step_00000102.pt", "step_00000150.pt"]


def test_memmap_replay_trains_checkpoints_and_resumes(tmp_path):
    from torchrl.data import LazyMemmapStorage

    first = make_trainer(tmp_path, total_frames=100, replay_memmap=True)
    assert isinstance(first.replay_buffer.storage, LazyMemmapStorage)
    first.train()
    scratch = tmp_path / "run" / "replay"
    assert any(scratch.rglob("*.memmap"))  # on disk under <log_dir>/replay, not in RAM
    second = make_trainer(tmp_path, total_frames=120, replay_memmap=True)
    second.resume()
    assert len(second.replay_buffer) == 100
    torch.testing.assert_close(second.replay_buffer[:]["observation"], first.replay_buffer[:]["observation"])
    second.train()
    assert len(second.replay_buffer) == 120 and second._optim_count == 10 + 120 - 50


def test_truncated_checkpoint_file_is_refused_before_loading(tmp_path):
    make_trainer(tmp_path, total_frames=60).train()
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-000000000060"
    victim = sorted((checkpoint / "components").glob("*-loss_module/state/*.memmap"))[1]
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[: size // 2])  # TorchRL would memory-map it and read garbage
    trainer = make_trainer(tmp_path, total_frames=100)
    with pytest.raises(CheckpointError, match=rf"{victim.name} has {size // 2} bytes, but its recorded shape .* "
                                              rf"needs {size} \(a truncated copy\?\)"):
        trainer.resume()
    assert trainer.collected_frames == 0
    with pytest.raises(CheckpointError, match="truncated"):
        load_world_model_from_trainer_checkpoint(tmp_path / "run")


def test_extra_eval_actors_write_their_own_csv(tmp_path):
    wm = tiny_world_model(obs_dim=39, action_dim=4)  # Meta-World: 100-step episodes keep the evaluations short
    trainer = make_trainer(tmp_path, world_model=wm, total_frames=100, eval_interval=50, eval_episodes=1,
                           eval_actors={"dream_mpc": PolicyActor(wm), "policy": PolicyActor(wm)}, checkpoints=False,
                           task="mw-reach")
    trainer.train()
    run = tmp_path / "run"
    main, extra = read_eval_csv(run / "eval.csv"), read_eval_csv(run / "eval_policy.csv")
    assert [step for step, _ in main] == [step for step, _ in extra] == [50, 100]
    # two identical deterministic actors on the same initial states: the same returns
    assert main == extra


class _Recorder(TensorDictModuleBase):
    """Wraps an actor; records the observation of every episode start it sees."""

    def __init__(self, act):
        super().__init__()
        self.act, self.starts = act, []
        self.in_keys, self.out_keys = ["observation", "is_init"], ["action"]

    def forward(self, td):
        if bool(td["is_init"].any()):
            self.starts.append(td["observation"].clone())
        return td.set("action", self.act(td["observation"]))


def test_evaluation_same_initial_states_and_metaworld_success(tmp_path):
    """Every actor, and every evaluation, starts from the same initial states (the env is reseeded), episodes differ
    among themselves (Meta-World draws a new goal per episode), and the success rate is the fraction of episodes
    whose success flag was set: 1 for TD-MPC2's scripted reach policy, 0 for an actor that does not move."""
    from metaworld.policies import SawyerReachV3Policy

    script = SawyerReachV3Policy()

    def scripted(obs):
        flat = obs.reshape(-1, obs.shape[-1]).double().numpy()
        actions = [torch.as_tensor(script.get_action(o), dtype=torch.float32) for o in flat]
        return torch.stack(actions).reshape(*obs.shape[:-1], -1).clamp(-1, 1)

    actors = {"scripted": _Recorder(scripted), "still": _Recorder(lambda obs: torch.zeros(*obs.shape[:-1], 4))}
    hook = EvaluationHook(actors, functools.partial(make_env, "mw-reach", seed=3), interval=0, episodes=2, seed=3,
                          csv_path=tmp_path / "eval.csv", verbose=False)
    for actor in actors.values():
        actor.starts.clear()  # (the collectors call each actor once when they are built, to read its outputs)
    first, second = hook.evaluate(0), hook.evaluate(10)
    hook.shutdown()
    assert (first["scripted"]["success"], first["still"]["success"]) == (1.0, 0.0)
    assert first["scripted"]["return"] == second["scripted"]["return"]  # deterministic actor, same initial states
    starts = [torch.stack(actor.starts) for actor in actors.values()]
    assert starts[0].shape[0] == starts[1].shape[0] == 4  # 2 episodes x 2 evaluations: no episode played for nothing
    for s in starts:
        torch.testing.assert_close(s[:2], s[2:], rtol=0, atol=0)  # each evaluation: the same initial states
    torch.testing.assert_close(starts[0], starts[1], rtol=0, atol=0)  # each actor: the same initial states
    assert not torch.equal(starts[0][0], starts[0][1])  # (two episodes do differ: the check is not vacuous)
    assert [s for s, _ in read_eval_csv(tmp_path / "eval.csv")] == [0, 10]
    assert [s for s, _ in read_eval_csv(tmp_path / "eval_still.csv")] == [0, 10]


def test_episode_metrics_count_episodes():
    # three episodes in one evaluation batch (traj_format="cat"): success at some step of episodes 0 and 2, at the
    # last step of episode 2 only (TD-MPC2 counts the last step)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    success = torch.tensor([0, 1, 0, 0, 0, 0, 0, 1], dtype=torch.bool).unsqueeze(-1)
    reward = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 0.5, 0.5, 0.5]).unsqueeze(-1)
    batch = TensorDict({"next": {"success": success, "reward": reward}, "collector": {"traj_ids": ids}}, [8])
    assert _episode_metrics(batch) == {"episode_returns": [6.0, 30.0, 1.5], "frames": 8,
                                       "episode_successes": [False, False, True], "success": pytest.approx(1 / 3),
                                       "episode_successes_any": [True, False, True],
                                       "success_any": pytest.approx(2 / 3)}
    # DMC: no success entry
    assert _episode_metrics(batch.exclude(("next", "success"))) == {"episode_returns": [6.0, 30.0, 1.5],
                                                                    "frames": 8}


def test_logger_truncation_on_resume_drops_later_rows(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torchrl.record.loggers import CSVLogger, TensorboardLogger

    logger = MultiLogger([TensorboardLogger(exp_name="tb", log_dir=str(tmp_path)),
                          CSVLogger(exp_name="csv", log_dir=str(tmp_path))])
    for step in range(0, 500, 100):
        logger.log_scalar("loss", float(step), step=step)
    logger.flush()
    logger.truncate_after(200)  # a run killed at step 400 resumes from its checkpoint of step 200
    for step in (300, 400):
        logger.log_scalar("loss", -float(step), step=step)  # the resumed run logs these steps again
    logger.flush()
    rows = (tmp_path / "csv" / "scalars" / "loss.csv").read_text().split()
    assert rows == ["0,0.0", "100,100.0", "200,200.0", "300,-300.0", "400,-400.0"]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(0, 0.0), (100, 100.0), (200, 200.0),
                                                                   (300, -300.0), (400, -400.0)]
    logger.shutdown()


# ---------------------------------------------------------------------------------------------------------
# progress of evaluations (EvaluationHook + EvaluationProgress)
# ---------------------------------------------------------------------------------------------------------
def _short_episode_env(episode_length=4, terminate_at=None):
    """A 4-step scripted task (reward 1 per simulator step, action repeat 2) wrapped as make_env wraps tasks."""
    import numpy as np
    from torchrl.envs import Compose, InitTracker, RewardSum, StepCounter, TransformedEnv

    from torchrl_dreammpc.envs._base import SimStep, SuiteEnv, TaskInfo

    class Scripted(SuiteEnv):
        def __init__(self):
            super().__init__(TaskInfo("scripted", "test", episode_length, 2, episodic=True, has_success=False), 1, 1)

        def _sim_reset(self):
            self.steps = 0
            return np.zeros(1)

        def _sim_step(self, action):
            self.steps += 1
            return SimStep(np.array([self.steps]), 1.0, self.steps == terminate_at, False, False)

        def _sim_seed(self, seed):
            pass

    return TransformedEnv(Scripted(), Compose(InitTracker(), StepCounter(), RewardSum()))


def _zero_actor():
    from tensordict.nn import TensorDictModule

    linear = torch.nn.Linear(1, 1)
    torch.nn.init.zeros_(linear.weight), torch.nn.init.zeros_(linear.bias)
    return TensorDictModule(linear, in_keys=["observation"], out_keys=["action"])


def test_evaluation_prints_progress_lines_and_each_actor_as_soon_as_done():
    import io

    from torchrl_dreammpc.trainers import EvaluationHook

    out = io.StringIO()
    actors = {"a": _zero_actor(), "b": _zero_actor()}
    calls = _count_calls(actors["a"])
    hook = EvaluationHook(actors, _short_episode_env, interval=0, episodes=3, seed=0, verbose=False,
                          progress="lines")
    hook.progress.file = out
    calls[0] = 0  # (building the collector ran the actor once)
    results = hook.evaluate(0, on_result=lambda name, m: print(f"ROW {name} {m['return']:.1f}", file=out))
    hook.shutdown()
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "[eval] a: episode 1/3", "[eval] a: episode 2/3", "[eval] a: episode 3/3", "ROW a 8.0",
        "[eval] b: episode 1/3", "[eval] b: episode 2/3", "[eval] b: episode 3/3", "ROW b 8.0"]
    assert all(", return 8.0, " in line and " elapsed, ~" in line and line.endswith(" left")
               for line in lines if not line.startswith("ROW"))
    assert results["a"]["episodes"] == 3 and results["a"]["return"] == 8.0
    assert calls[0] == 3 * 4  # exactly the episodes asked for (4-step episodes: polls of one episode)


def test_evaluation_progress_bar_counts_steps_and_early_ends():
    import io

    from torchrl_dreammpc.trainers import EvaluationHook

    out = io.StringIO()
    # Episodes end (terminated) after 2 of their 4 agent steps: the bar still reaches episodes x length.
    hook = EvaluationHook({"a": _zero_actor()}, functools.partial(_short_episode_env, terminate_at=3), interval=0,
                          episodes=3, seed=0, verbose=False, progress="bar")
    hook.progress.file = out
    results = hook.evaluate(0)
    hook.shutdown()
    text = out.getvalue()
    assert "[eval] a" in text and "12/12" in text and "episodes 3/3, last return 3.0" in text
    assert results["a"]["episode_length"] == 2.0


def test_evaluation_ms_per_step_counts_the_steps_played_past_the_last_episode(monkeypatch):
    """Episodes that end early leave the collector playing on to the end of its poll (here one episode length): those
    steps take time too, so ms per step divides by every step played, not only the kept episodes' (TorchRL's fps).
    A fake clock advances 1 s per actor call: 3 episodes of 2 steps kept, 8 steps played, 1000 ms per step."""
    from torchrl.collectors import _evaluator

    from torchrl_dreammpc.trainers import EvaluationHook

    clock = [0.0]
    monkeypatch.setattr(_evaluator, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    actor = _zero_actor()
    actor.register_forward_hook(lambda *args: clock.__setitem__(0, clock[0] + 1.0))
    hook = EvaluationHook({"a": actor}, functools.partial(_short_episode_env, terminate_at=3), interval=0,
                          episodes=3, seed=0, verbose=False)  # progress off: the steps are counted anyway
    result = hook.evaluate(0)["a"]
    hook.shutdown()
    assert (result["episodes"], result["episode_length"], hook.progress.steps_played) == (3, 2.0, 8)
    assert result["ms_per_step"] == pytest.approx(1000.0)


def test_evaluation_polls_at_most_poll_steps_past_the_last_episode():
    """Episodes that end early (2 of a 40-step episode's agent steps): the collector stops polling once it holds the
    episodes asked for, so it plays past the last one at most ``poll_steps - 1`` steps, not the rest of an episode."""
    from torchrl_dreammpc.trainers import EvaluationHook

    played = {}
    for poll_steps in (100, 4, 1):
        hook = EvaluationHook({"a": _zero_actor()}, functools.partial(_short_episode_env, 40, terminate_at=3),
                              interval=0, episodes=3, seed=0, verbose=False, poll_steps=poll_steps)
        result = hook.evaluate(0)["a"]
        hook.shutdown()
        assert (result["episodes"], result["episode_length"], result["return"]) == (3, 2.0, 3.0)
        played[poll_steps] = hook.progress.steps_played
    assert played == {100: 40, 4: 8, 1: 6}  # polls of one episode (40 steps), of 4 steps, of one step
    with pytest.raises(ValueError, match="poll_steps must be a positive integer, got 0"):
        EvaluationHook({"a": _zero_actor()}, _short_episode_env, interval=0, episodes=1, seed=0, poll_steps=0)


def test_evaluation_episodes_do_not_depend_on_the_poll_size():
    """The collector assembles episodes across its polls: polls of 7 steps (episodes straddle them) keep exactly
    the episodes, step for step, that polls of a whole 30-step episode keep, for an actor drawing from torch's RNG."""
    from tensordict.nn import TensorDictModule

    from torchrl_dreammpc.trainers import EvaluationHook

    actor = TensorDictModule(lambda obs: torch.rand(*obs.shape[:-1], 1) * 2 - 1, in_keys=["observation"],
                             out_keys=["action"])
    returns = {}
    for poll_steps in (30, 7):
        hook = EvaluationHook({"random": actor}, functools.partial(make_env, "cartpole-swingup", seed=0),
                              interval=0, episodes=3, seed=0, max_steps=30, verbose=False, torch_seed=5,
                              poll_steps=poll_steps)
        returns[poll_steps] = hook.evaluate(0)["random"]["episode_returns"]
        hook.shutdown()
    assert len(returns[7]) == 3 and len(set(returns[7])) == 3  # three different episodes (the check is not vacuous)
    assert returns[7] == returns[30]


def test_evaluation_max_steps_truncates_every_episode():
    """``max_steps`` ends the episodes early (TorchRL's Evaluator ignores its own cap on envs that count their
    steps, as every task env does): 2 of 4 steps, half the return, every episode."""
    from torchrl_dreammpc.trainers import EvaluationHook, cap_episode_length

    full, capped = (EvaluationHook({"a": _zero_actor()}, _short_episode_env, interval=0, episodes=3, seed=0,
                                   verbose=False, max_steps=max_steps) for max_steps in (None, 2))
    full_result, capped_result = full.evaluate(0)["a"], capped.evaluate(0)["a"]
    full.shutdown(), capped.shutdown()
    assert (full_result["episode_length"], full_result["return"]) == (4.0, 8.0)
    assert (capped_result["episode_length"], capped_result["return"], capped_result["episodes"]) == (2.0, 4.0, 3.0)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"max_steps must be a positive integer or None, got {bad!r}"):
            cap_episode_length(_short_episode_env(), bad)


def test_planner_diagnostics_are_logged_in_training_and_evaluation(tmp_path):
    """planner.diagnostics=true: the acting planner's ("planner", ...) entries become planner/<name> scalars (the
    mean over each log interval) and evaluation metrics; a planner without them logs none. The throughput is
    logged every log interval too."""
    import csv

    wm = tiny_world_model()
    actor = GradientMPCPlanner(wm, diagnostics=True)
    trainer = make_trainer(tmp_path, world_model=wm, actor=actor, total_frames=100, log_interval=20,
                           checkpoints=False, eval_interval=100, eval_episodes=1)
    trainer.train()
    scalars = tmp_path / "run" / "csv" / "scalars"
    rows = list(csv.reader((scalars / "planner" / "objective_after.csv").open()))
    steps = [int(float(row[0])) for row in rows]
    assert steps and steps[0] > 50 and all(b - a >= 20 for a, b in zip(steps, steps[1:]))  # acting steps only
    assert (scalars / "planner" / "uncertainty.csv").exists() and (scalars / "planner" / "candidate.csv").exists()
    throughput = [int(float(row[0])) for row in csv.reader((scalars / "time" / "steps_per_second.csv").open())]
    assert len(throughput) >= 4 and {b - a for a, b in zip(throughput, throughput[1:])} == {20}  # every interval
    metrics = trainer.evaluation.history[-1][1]
    assert {"planner/objective_before", "planner/objective_after"} <= set(metrics)
    assert metrics["planner/objective_after"] >= metrics["planner/objective_before"] - 1e-4  # a chosen candidate
    plain = make_trainer(tmp_path / "plain", world_model=wm, actor=GradientMPCPlanner(wm), total_frames=60,
                         checkpoints=False)
    plain.train()
    assert not (tmp_path / "plain" / "run" / "csv" / "scalars" / "planner").exists()


def test_evaluation_progress_modes(capsys):
    import io

    from torchrl_dreammpc.trainers import EvaluationHook, EvaluationProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert EvaluationProgress("auto", file=io.StringIO()).mode == "lines"  # a log file, a pipe
    assert EvaluationProgress(True, file=Terminal()).mode == "bar"
    assert EvaluationProgress(False).mode == "off" and not EvaluationProgress("off").enabled
    with pytest.raises(ValueError, match="progress must be one of"):
        EvaluationProgress("loud")
    quiet = EvaluationHook({"a": _zero_actor()}, _short_episode_env, interval=0, episodes=1, seed=0, verbose=False)
    assert quiet.progress.mode == "off"  # the trainer's default: its own output only
    capsys.readouterr()
    quiet.evaluate(0)
    quiet.shutdown()
    assert capsys.readouterr() == ("", "") and quiet.progress.steps_played == 4  # counted, not shown
