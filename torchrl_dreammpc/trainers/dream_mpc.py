"""Online TD-MPC2 / Dream-MPC training on top of :class:`torchrl.trainers.Trainer`."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tensordict import NestedKey, TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.checkpoint import Checkpoint, CheckpointRotation, GlobalRNGState
from torchrl.checkpoint import CheckpointError as TorchRLCheckpointError
from torchrl.collectors import Collector, MultiSyncCollector
from torchrl.envs import EnvBase
from torchrl.record.loggers import CSVLogger, TensorboardLogger
from torchrl.objectives import LossModule
from torchrl.trainers import OptimizationStepper, Trainer, TrainerHookBase, UpdateWeights

from torchrl_dreammpc._checks import check_float
from torchrl_dreammpc.envs import with_transforms
from torchrl_dreammpc.modules.base import WorldModelBase
from torchrl_dreammpc.objectives.tdmpc2 import TDMPC2Loss, TDMPC2PolicyLoss
from torchrl_dreammpc.trainers.hooks import (
    CollectorCountersState,
    EpisodeReturnLogger,
    EvaluationHook,
    MultiLogger,
    PlannerDiagnosticsLogger,
    WorldModelSnapshots,
)
from torchrl_dreammpc.trainers.replay import (
    EXPERT_KEYS,
    REPLAY_KEYS,
    STEP_KEY,
    STREAM_KEY,
    TRAJ_KEY,
    SliceReplayBufferTrainer,
    make_replay_buffer,
    mark_missing_experts,
    mark_one_stream,
)
from torchrl_dreammpc.trainers.stepper import NonFiniteUpdateError, TDMPC2OptimizationStepper

__all__ = [
    "DreamMPCTrainer",
    "ConfigMismatchError",
    "UpdateParts",
    "UPDATE_BUILDERS",
    "seed_steps",
    "read_fingerprint",
    "find_trainer_checkpoint",
    "load_world_model_from_trainer_checkpoint",
    "verify_checkpoint_files",
]

#: Fingerprint entries that must agree between a checkpoint and the run resuming from it.
FINGERPRINT_KEYS = ("task", "algorithm", "model_size", "obs_dim", "action_dim", "planner", "horizon",
                    "batch_size", "buffer_capacity", "replay_across_episodes", "replay_context", "replay_online")
#: Values of fingerprint entries added after checkpoints were first written (older checkpoints lack them).
FINGERPRINT_DEFAULTS = {"algorithm": "tdmpc2", "replay_across_episodes": False, "replay_context": False,
                        "replay_online": False}


class _StoppedBeforeCollecting(Exception):
    """Raised by a setup op to leave :meth:`DreamMPCTrainer.train` before its loop collects a step."""


class ConfigMismatchError(ValueError):
    """A checkpoint was written by a run with another task / model size / planner; the message names the field."""


@dataclasses.dataclass
class UpdateParts:
    """An algorithm's update, as :class:`DreamMPCTrainer` wires it (what an :data:`UPDATE_BUILDERS` entry returns).

    Attributes:
        loss_module: the Trainer's ``loss_module`` (checkpointed: it holds the model's weights under
            ``world_model.``).
        stepper: the Trainer's ``optimization_stepper``.
        replay_keys: entries the replay buffer stores besides :data:`~torchrl_dreammpc.trainers.replay.REPLAY_KEYS`.
        replay_preprocess: applied to the collected rows before they are stored (see ``SliceReplayBufferTrainer``).
        hooks: trainer hooks registered after the replay hook (each has ``register(trainer)``).
        replay_stream_key: where set, the replay's slices cross episode ends and are cut where this id changes
            (:data:`~torchrl_dreammpc.trainers.replay.STREAM_KEY`, which ``replay_preprocess`` writes); ``None``:
            slices lie within one trajectory.
        replay_context_key: where set, each stored row keeps a latent there that replayed sequences start from
            (DreamerV3's replay context: ``replay_preprocess`` stores it, a hook writes it back); ``None``: none.
        replay_online: DreamerV3's online queue (needs ``replay_stream_key``): every slice of new rows is sampled
            once before the uniform ones (:class:`~torchrl_dreammpc.trainers.replay.OnlineStreamSampler`).
    """

    loss_module: LossModule
    stepper: OptimizationStepper
    replay_keys: tuple = ()
    replay_preprocess: Callable | None = None
    hooks: list = dataclasses.field(default_factory=list)
    replay_stream_key: NestedKey | None = None
    replay_context_key: NestedKey | None = None
    replay_online: bool = False


def _require_family(algorithm: str, world_model) -> None:
    """Each algorithm trains the world-model family of the same name (``world_model.family``)."""
    family = getattr(world_model, "family", None)
    if family != algorithm:
        raise TypeError(f"algorithm={algorithm!r} trains a world model of family {algorithm!r}, got a "
                        f"{type(world_model).__name__} (family {family!r}, trained by algorithm={family!r}).")


def _tdmpc2_update(world_model, *, lr, enc_lr_scale, grad_clip, tau, compile, loss_kwargs, policy_loss_kwargs):
    """TD-MPC2's update: :class:`TDMPC2Loss`, :class:`TDMPC2PolicyLoss`, :class:`TDMPC2OptimizationStepper`."""
    _require_family("tdmpc2", world_model)
    loss_module = TDMPC2Loss(world_model, **loss_kwargs)
    policy_loss = TDMPC2PolicyLoss(world_model, **policy_loss_kwargs)
    stepper = TDMPC2OptimizationStepper(loss_module, policy_loss=policy_loss, lr=lr, enc_lr_scale=enc_lr_scale,
                                        grad_clip=grad_clip, tau=tau, compile=compile)
    return UpdateParts(loss_module, stepper)


def _bmpc_update(world_model, *, lr, enc_lr_scale, grad_clip, tau, compile, loss_kwargs, policy_loss_kwargs,
                 reanalyze=None):
    """BMPC's update (:func:`~torchrl_dreammpc.trainers.bmpc.make_bmpc_update`): its losses and stepper, the
    expert distribution stored with every transition (NaN where no planner wrote one) and the lazy-reanalyze
    hook. ``reanalyze``: the hook's options (``algorithm_kwargs={"reanalyze": {...}}`` of the trainer)."""
    from torchrl_dreammpc.trainers.bmpc import make_bmpc_update

    _require_family("bmpc", world_model)
    loss_module, stepper, hook = make_bmpc_update(
        world_model, lr=lr, enc_lr_scale=enc_lr_scale, grad_clip=grad_clip, tau=tau, compile=compile,
        loss_kwargs=loss_kwargs, policy_loss_kwargs=policy_loss_kwargs, reanalyze=reanalyze)
    return UpdateParts(loss_module, stepper, replay_keys=EXPERT_KEYS, replay_preprocess=mark_missing_experts,
                       hooks=[hook])


def _dreamer_v3_update(world_model, *, lr, enc_lr_scale, grad_clip, tau, compile, loss_kwargs, policy_loss_kwargs,
                       replay_across_episodes=False, replay_context=False, replay_online=False):
    """DreamerV3's update (:func:`~torchrl_dreammpc.trainers.dreamer_v3.make_dreamer_v3_update`): ``loss_kwargs``
    holds its optimizer and loss arguments; ``enc_lr_scale``, ``grad_clip`` and ``tau`` are TD-MPC2's and unused.
    ``replay_across_episodes``: replayed sequences run across episode ends, as DreamerV3's windows (the rows keep
    ``"is_init"``, where the RSSM restarts); otherwise each lies within one episode. With it, DreamerV3's two other
    replay settings: ``replay_context``, the rows also keep the posterior of their observation, where sequences
    start (:class:`~torchrl_dreammpc.trainers.dreamer_v3.ReplayContext`, ``replay_context: 1``), and
    ``replay_online``, each new slice of the stream is replayed once first
    (:class:`~torchrl_dreammpc.trainers.replay.OnlineStreamSampler`, ``replay.online: True``)."""
    from torchrl_dreammpc.trainers.dreamer_v3 import REPLAY_LOSS_KEYS, ReplayContext, make_dreamer_v3_update

    _require_family("dreamer_v3", world_model)
    if policy_loss_kwargs:
        raise ValueError("algorithm='dreamer_v3' takes no policy_loss_kwargs: its actor loss arguments go in "
                         "loss_kwargs.")
    given = sorted(set(REPLAY_LOSS_KEYS) & set(loss_kwargs))
    if given:
        raise ValueError(f"loss_kwargs {given} are set by replay_across_episodes / replay_context, not passed.")
    options = dict(replay_across_episodes=replay_across_episodes, replay_context=replay_context,
                   replay_online=replay_online)
    for name, value in options.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}.")
    if not replay_across_episodes:
        for name in ("replay_context", "replay_online"):
            if options[name]:
                raise ValueError(f"{name}=True needs replay_across_episodes=True (DreamerV3's replay: windows over "
                                 "the stream of steps, across episode ends).")
        return UpdateParts(*make_dreamer_v3_update(world_model, lr=lr, compile=compile, **loss_kwargs))
    context = ReplayContext(world_model, first_key="is_init") if replay_context else None
    loss_module, stepper = make_dreamer_v3_update(world_model, lr=lr, compile=compile, first_key="is_init",
                                                  replay_context=context, **loss_kwargs)
    parts = UpdateParts(loss_module, stepper, replay_keys=("is_init", STREAM_KEY), replay_preprocess=mark_one_stream,
                        replay_stream_key=STREAM_KEY, replay_online=replay_online)
    if context is not None:
        parts.replay_keys += (context.key,)
        parts.replay_preprocess = lambda rows: context.mark(mark_one_stream(rows))
        parts.hooks.append(context)
        parts.replay_context_key = context.key
    return parts


#: Per algorithm, what builds its update: ``(world_model, *, lr, enc_lr_scale, grad_clip, tau, compile, loss_kwargs,
#: policy_loss_kwargs, **algorithm_kwargs) -> UpdateParts``. Each trains the world-model family of its name.
UPDATE_BUILDERS: dict[str, Callable[..., UpdateParts]] = {
    "tdmpc2": _tdmpc2_update,
    "bmpc": _bmpc_update,
    "dreamer_v3": _dreamer_v3_update,
}
#: Training algorithms (the update: losses and stepper) that :class:`DreamMPCTrainer` runs.
ALGORITHMS = tuple(UPDATE_BUILDERS)


def seed_steps(episode_length: int) -> int:
    """TD-MPC2's seeding phase: ``max(1000, 5 * episode_length)`` agent steps of uniformly random actions.

    Examples:
        >>> seed_steps(500)  # DMC
        2500
        >>> seed_steps(100)  # Meta-World
        1000
    """
    return max(1000, 5 * int(episode_length))


def read_fingerprint(path: str | Path) -> dict[str, Any]:
    """The run fingerprint stored in a trainer checkpoint's manifest (read without loading any payload)."""
    metadata = Checkpoint.manifest(path).get("metadata", {})
    fingerprint = metadata.get("fingerprint")
    if fingerprint is None:
        raise ConfigMismatchError(f"{path} is a TorchRL checkpoint without a torchrl_dreammpc run fingerprint.")
    return fingerprint


def find_trainer_checkpoint(path: str | Path) -> Path | None:
    """The trainer checkpoint ``path`` points to: the checkpoint itself, or the newest complete one of a
    checkpoint directory or of a run directory (``<run>/checkpoints``). ``None`` if there is none."""
    path = Path(path)
    if Checkpoint.is_checkpoint(path):
        return path
    for directory in (path / "checkpoints", path):
        if directory.is_dir():
            latest = CheckpointRotation(directory, keep_last=1).latest()
            if latest is not None:
                return latest
    return None


def verify_checkpoint_files(path: str | Path, components: Sequence[str] | None = None) -> None:
    """Checks that a trainer checkpoint's files are all there and whole, before anything is loaded from it.

    TorchRL memory-maps tensor files when it loads a checkpoint, so a truncated file (a copy cut short, a full
    disk) would load as zeros or garbage without any error. This compares every ``*.memmap`` file with the shape
    and dtype recorded beside it (``meta.json``) and checks that every file the manifest lists exists.

    Args:
        path: the checkpoint directory.
        components (sequence of str, optional): only these components. Default: all.

    Raises:
        CheckpointError: naming the checkpoint, the file and what is wrong with it.
    """
    from torchrl_dreammpc.checkpoints import CheckpointError

    path = Path(path)
    try:
        records = Checkpoint.manifest(path)["components"]
    except Exception as err:
        raise CheckpointError(f"{path} has no readable checkpoint manifest: {err}") from err
    for name, record in records.items():
        if components is not None and name not in components:
            continue
        root = path / record["path"]
        for rel in record.get("files", ()):
            if not (root / rel).is_file():
                raise CheckpointError(f"Checkpoint {path} is incomplete: component {name!r} lacks {rel}.")
        for meta in root.rglob("meta.json"):
            try:
                entries = json.loads(meta.read_text())
            except ValueError as err:
                raise CheckpointError(f"Checkpoint {path} is corrupted: {meta.relative_to(path)} is not JSON "
                                      f"({err}).") from err
            for key, info in entries.items():
                if not isinstance(info, dict) or info.get("is_nested") or "shape" not in info:
                    continue
                file = meta.parent / f"{key}.memmap"
                dtype = getattr(torch, str(info.get("dtype", "")).removeprefix("torch."), None)
                if not file.exists() or not isinstance(dtype, torch.dtype):
                    continue
                expected = math.prod(info["shape"]) * dtype.itemsize
                size = file.stat().st_size
                if size != expected:
                    raise CheckpointError(
                        f"Checkpoint {path} is corrupted: {file.relative_to(path)} has {size} bytes, but its "
                        f"recorded shape {info['shape']} of {dtype} needs {expected} (a truncated copy?).")


class _PrefixedState:
    """Checkpoint view of a module stored inside a larger one under ``prefix`` (the other entries are ignored)."""

    def __init__(self, module: torch.nn.Module, prefix: str) -> None:
        self.module, self.prefix = module, prefix

    def state_dict(self) -> dict[str, Any]:
        return {self.prefix + key: value for key, value in self.module.state_dict().items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        n = len(self.prefix)
        self.module.load_state_dict({key[n:]: value for key, value in state_dict.items()
                                     if key.startswith(self.prefix)})


def load_world_model_from_trainer_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                                             ) -> tuple[WorldModelBase, dict[str, Any]]:
    """Rebuilds the world model of a :class:`DreamMPCTrainer` checkpoint (a run dir or a checkpoint dir).

    The model (of the family the checkpoint's ``algorithm`` trains: TD-MPC2's, BMPC's or DreamerV3's) is built from
    the config stored in the checkpoint's fingerprint, then only its weights are read from the ``loss_module``
    component (every loss module holds the model under ``world_model.``, target values included); the replay
    buffer and the rest stay on disk.

    Returns:
        ``(world_model in eval mode, fingerprint)``.
    """
    from torchrl_dreammpc.checkpoints import CheckpointError, build_world_model, check_finite_state

    checkpoint_path = find_trainer_checkpoint(path)
    if checkpoint_path is None:
        raise FileNotFoundError(f"No trainer checkpoint found at {path}.")
    fingerprint = read_fingerprint(checkpoint_path)
    algorithm = fingerprint.get("algorithm", FINGERPRINT_DEFAULTS["algorithm"])
    if algorithm not in UPDATE_BUILDERS:
        raise ConfigMismatchError(f"{checkpoint_path} was written by algorithm {algorithm!r}; this code knows "
                                  f"{list(ALGORITHMS)}.")
    try:
        world_model = build_world_model(algorithm, fingerprint["world_model"])  # each algorithm: its own family
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{checkpoint_path} records an invalid world-model config: {err}") from err
    verify_checkpoint_files(checkpoint_path, ["loss_module"])
    checkpoint = Checkpoint(loss_module=_PrefixedState(world_model, "world_model."))
    try:
        checkpoint.load(checkpoint_path, components=["loss_module"], map_location="cpu")
    except (TorchRLCheckpointError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"Could not load the world model of {checkpoint_path}: {err}") from err
    check_finite_state(world_model.state_dict(), f"Checkpoint {checkpoint_path}")
    return world_model.to(device).eval(), {**fingerprint, "checkpoint": str(checkpoint_path)}


class _UpdateSchedule(TrainerHookBase):
    """Updates owed per collected batch: ``utd_ratio`` per frame, fractional parts carried over, and what is left
    of the seed phase's pre-training burst (both checkpointed: a run stopped inside the burst does the rest of it
    when resumed, not nothing)."""

    def __init__(self, utd_ratio: float, pretrain_updates: int = 0) -> None:
        self.utd_ratio = float(utd_ratio)
        self.credit = 0.0
        # None: read from a checkpoint written before this was recorded (the trainer infers it, optim_steps)
        self.pretrain_left: int | None = int(pretrain_updates)
        # The burst's updates done before a stop and their mean losses: its one log entry, written when it ends
        # (in the resumed run), covers the whole burst.
        self.pretrain_done: tuple[int, dict[str, float]] | None = None

    def __call__(self, frames: int) -> int:
        self.credit += self.utd_ratio * frames
        updates = int(self.credit + 1e-9)
        self.credit -= updates
        return updates

    @staticmethod
    def infer_pretrain_left(pretrain_updates: int, optim_count: int) -> int:
        """The burst left by a checkpoint from before it was recorded: all of it before any update, else none."""
        return pretrain_updates if optim_count == 0 else 0

    def state_dict(self) -> dict[str, Any]:
        done = self.pretrain_done
        return {"utd_ratio": self.utd_ratio, "credit": self.credit, "pretrain_left": self.pretrain_left,
                "pretrain_done_updates": 0 if done is None else done[0],
                "pretrain_done_losses": {} if done is None else dict(done[1])}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.credit = float(state_dict["credit"])
        left = state_dict.get("pretrain_left")
        self.pretrain_left = None if left is None else int(left)
        done = int(state_dict.get("pretrain_done_updates", 0))  # absent from checkpoints written before it
        self.pretrain_done = (done, dict(state_dict["pretrain_done_losses"])) if done else None

    def register(self, trainer: Trainer, name: str = "update_schedule") -> None:
        trainer.register_module(name, self)


class DreamMPCTrainer(Trainer):
    """Online TD-MPC2 training of a latent world model, acting with a planner (Dream-MPC, MPPI or the prior).

    Built like TorchRL's :class:`~torchrl.trainers.algorithms.SACTrainer`: from an env factory, a world model,
    an actor and a few explicit arguments, it wires TorchRL's pieces and runs
    :meth:`torchrl.trainers.Trainer.train`:

    - **collector**: :class:`~torchrl.collectors.Collector` (``num_workers=1``), a
      :class:`~torchrl.collectors.MultiSyncCollector` (``num_workers > 1``) or a
      :class:`~torchrl.collectors.distributed.RayCollector` (``collector_backend="ray"``). With the
      single-process collector the actor runs in this process on the very modules being trained: the
      collector keeps the actor object it is given (no policy copy, no per-step weight transfer, so no
      :class:`~torchrl.trainers.UpdateWeights` hook); the other two get weights through an ``UpdateWeights``
      hook after every batch.
    - **seed phase** (TD-MPC2's ``seed_steps``): ``seed_frames`` steps of uniformly random actions
      (the collector's ``init_random_frames``), then ``pretrain_updates`` updates at once (TD-MPC2: as many as
      seed steps; in slices of :attr:`PRETRAIN_SLICE` that a stop request ends, the rest done on resume), then
      ``utd_ratio`` updates per collected step (1).
    - **replay**: :class:`~torchrl.data.TensorDictReplayBuffer` over a
      :class:`~torchrl.data.LazyTensorStorage` (or memmap), :class:`~torchrl.data.SliceSampler` slices of
      ``horizon`` transitions (``horizon + 1`` observations) that never cross an episode end, reshaped to
      ``[batch_size, horizon]`` (:class:`SliceReplayBufferTrainer`).
    - **update**: :class:`TDMPC2OptimizationStepper` (world model, then policy prior, then soft target update),
      or BMPC's (``algorithm="bmpc"``: :class:`BMPCOptimizationStepper` and the :class:`LazyReanalyze` hook).
    - **evaluation**: :class:`EvaluationHook` around :class:`torchrl.collectors.Evaluator`
      (``ExplorationType.DETERMINISTIC``), every ``eval_interval`` steps, writing ``eval.csv``.
    - **logging**: :class:`~torchrl.record.loggers.TensorboardLogger` and :class:`~torchrl.record.loggers.CSVLogger`
      under ``log_dir``.
    - **checkpoints**: :class:`torchrl.checkpoint.Checkpoint` + :class:`~torchrl.checkpoint.CheckpointRotation`
      (keep the last ``keep_checkpoints``; each one is staged and renamed into place, so a killed run never
      leaves a half-written checkpoint where :meth:`resume` looks). A checkpoint holds the model, both
      optimizers, the running Q scale, the replay buffer, the step counters, the collector's frame and
      trajectory counters, the global RNG state (:class:`~torchrl.checkpoint.GlobalRNGState`), the evaluation
      and logging state, and (in its manifest) the run fingerprint: task, algorithm, model size, observation and
      action widths, planner, horizon, batch size, buffer capacity, world-model config.

    Steps are agent steps (one ``env.step``; the simulator runs ``action_repeat`` steps in each).

    Args:
        create_env_fn (callable): builds the training env (``() -> EnvBase``), e.g.
            ``functools.partial(make_env, "cartpole-swingup", seed=1)``.
        world_model (WorldModelBase): the model to train, of the family ``algorithm`` trains (checked):
            :class:`~torchrl_dreammpc.modules.TDMPC2WorldModel`, :class:`~torchrl_dreammpc.modules.BMPCWorldModel`
            with ``algorithm="bmpc"``, :class:`~torchrl_dreammpc.modules.DreamerV3WorldModel` with
            ``algorithm="dreamer_v3"`` (the envs then get its
            :meth:`~torchrl_dreammpc.modules.WorldModelBase.acting_transforms`).
        actor (TensorDictModuleBase): the acting module, a planner over ``world_model`` itself (checked: an actor
            without ``world_model`` among its submodules is refused).
        total_frames (int): agent steps to train for.

    Keyword Args:
        batch_size (int): sub-trajectories per update (TD-MPC2: 256).
        horizon (int): transitions per sub-trajectory (TD-MPC2: 3).
        buffer_capacity (int, optional): replay capacity, ``>= horizon``. ``None`` (default): ``min(total_frames,
            1_000_000)`` (TD-MPC2).
        seed (int): seeds the collector's env, torch and numpy (:meth:`Trainer.set_seed`).
        episode_length (int, optional): agent steps per episode; sizes the seed phase. Read from the env's
            ``info.episode_length`` (torchrl_dreammpc envs) if not given.
        seed_frames (int, optional): random-action steps. Defaults to :func:`seed_steps` ``(episode_length)``.
        pretrain_updates (int, optional): updates run once at the end of the seed phase. Defaults to
            ``seed_frames`` (TD-MPC2).
        utd_ratio (float): updates per collected step afterwards (TD-MPC2: 1).
        frames_per_batch (int): steps per collector batch and worker (1: act, then update, as TD-MPC2).
        lr (float), enc_lr_scale (float), grad_clip (float), tau (float), compile (bool or str): see
            :class:`TDMPC2OptimizationStepper` (``"dreamer_v3"``: only ``lr``; ``compile`` must be ``False``;
            ``"bmpc"``: ``compile`` also compiles the reanalyze planner, :func:`make_bmpc_update`).
        algorithm (str): the update, one of :data:`ALGORITHMS`, built by :data:`UPDATE_BUILDERS` and recorded in the
            checkpoint fingerprint: ``"tdmpc2"`` (TD-MPC2's losses and stepper), ``"bmpc"`` (BMPC's, for a
            :class:`~torchrl_dreammpc.modules.BMPCWorldModel`, with the expert distribution in the replay buffer
            and the lazy reanalyze; the acting planner may write the expert too, ``expert_key="expert"``) or
            ``"dreamer_v3"`` (TorchRL's DreamerV3 losses and stepper, for a
            :class:`~torchrl_dreammpc.modules.DreamerV3WorldModel`; ``horizon`` is then the replayed sequence
            length). Default ``"tdmpc2"``.
        loss_kwargs (dict, optional): extra arguments of the algorithm's loss (:class:`TDMPC2Loss` /
            ``BMPCLoss``: coefficients, rho); for ``"dreamer_v3"`` the arguments of
            :func:`~torchrl_dreammpc.trainers.dreamer_v3.make_dreamer_v3_update`.
        policy_loss_kwargs (dict, optional): extra arguments of its policy loss (``TDMPC2PolicyLoss`` /
            ``BMPCPolicyLoss``).
        algorithm_kwargs (dict, optional): extra arguments of its update builder (BMPC: ``reanalyze``, see
            :func:`~torchrl_dreammpc.trainers.bmpc.make_bmpc_update`; DreamerV3: ``replay_across_episodes``,
            replayed sequences across episode ends, with ``num_workers=1``, and with it ``replay_context``,
            sequences starting from the stored posterior of their first row, and ``replay_online``, DreamerV3's
            online queue).
        eval_interval (int): steps between evaluations (``0``: none). Default 10_000.
        eval_episodes (int): episodes per evaluation. Default 10.
        eval_actors (mapping, optional): ``{name: actor}`` evaluated each time, the first being the training
            planner's. Defaults to ``{planner_name: actor}``, the training planner itself: evaluation plans from a
            warm start of its own and on a fork of torch's RNG, so the training goes on exactly as it would have
            without it. Each must act through ``world_model`` too.
        create_eval_env_fn (callable, optional): builds the evaluation envs. Defaults to ``create_env_fn``.
        eval_seed (int, optional): seed of the evaluation envs, reset before each evaluation. Defaults to
            ``seed + 1000``.
        eval_at_start (bool): also evaluate at step 0, before training (TD-MPC2 does). Default ``True``.
        log_dir (str or Path, optional): run directory: ``tb/`` (TensorBoard), ``csv/`` (CSV scalars),
            ``eval.csv``, ``world_model.pt`` at the end. ``None``: no logging.
        log_interval (int): steps between two logs of the training losses. Default 1000.
        checkpoint_dir (str or Path, optional): where checkpoints rotate. ``None``: no checkpoints.
        checkpoint_interval (int): steps between checkpoints (on multiples of it). Default 10_000.
        keep_checkpoints (int): checkpoints kept. Default 3.
        snapshot_interval (int): steps between world-model snapshots that rotation never deletes
            (``<log_dir>/snapshots/step_<N>.pt``, also at step 0; :class:`WorldModelSnapshots`). ``0``: none
            (default). Needs ``log_dir``.
        num_workers (int): collector workers. Default 1.
        collector_backend (str): ``"local"`` (in-process, or one process per worker) or ``"ray"``.
        ray_init_config (dict, optional): ``ray.init`` arguments of the Ray backend.
        replay_memmap (bool): keep the replay buffer on disk (memmap), in ``<log_dir>/replay`` (scratch space,
            emptied when a trainer is built: the checkpoints hold the buffer). Default ``False``.
        replay_whole_episodes (bool): write each episode to the replay buffer when it ends, as TD-MPC2 does
            (:class:`SliceReplayBufferTrainer` ``whole_episodes``); ``seed_frames`` must then cover an episode.
            Default ``False``: each step is written as it is collected, and the episode being collected gets
            1/(N+1) of the sampled slices (docs/architecture.md, *Known differences*).
        device (torch.device, optional): where samples are moved for the update. Defaults to the model's device.
        task (str, optional), planner_name (str, optional): recorded in the checkpoint fingerprint.
        progress_bar (bool): tqdm progress bar. Default ``False`` (one line per evaluation is printed).
        verbose (bool): print seed-phase, checkpoint and evaluation lines. Default ``True``.
        learner_backend (str): only ``"local"``; see docs/scaling.md for TorchRL's ``"ray"`` learner.

    Examples:
        >>> import functools
        >>> from torchrl_dreammpc.envs import make_env
        >>> from torchrl_dreammpc.modules import TDMPC2WorldModel
        >>> from torchrl_dreammpc.planners import GradientMPCPlanner
        >>> wm = TDMPC2WorldModel(5, 1, model_size=1)
        >>> trainer = DreamMPCTrainer(
        ...     create_env_fn=functools.partial(make_env, "cartpole-swingup", seed=1),
        ...     world_model=wm, actor=GradientMPCPlanner(wm), total_frames=100_000,
        ...     log_dir="runs/cartpole", checkpoint_dir="runs/cartpole/checkpoints")  # doctest: +SKIP
        >>> trainer.resume()  # continue from the last complete checkpoint, if any  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        create_env_fn: Callable[[], EnvBase],
        world_model: WorldModelBase,
        actor: TensorDictModuleBase,
        total_frames: int,
        batch_size: int = 256,
        horizon: int = 3,
        buffer_capacity: int | None = None,
        seed: int = 0,
        episode_length: int | None = None,
        seed_frames: int | None = None,
        pretrain_updates: int | None = None,
        utd_ratio: float = 1.0,
        frames_per_batch: int = 1,
        lr: float = 3e-4,
        enc_lr_scale: float = 0.3,
        grad_clip: float = 20.0,
        compile: bool | str = False,
        tau: float = 0.01,
        algorithm: str = "tdmpc2",
        loss_kwargs: Mapping[str, Any] | None = None,
        policy_loss_kwargs: Mapping[str, Any] | None = None,
        algorithm_kwargs: Mapping[str, Any] | None = None,
        eval_interval: int = 10_000,
        eval_episodes: int = 10,
        eval_actors: Mapping[str, TensorDictModuleBase] | None = None,
        create_eval_env_fn: Callable[[], EnvBase] | None = None,
        eval_seed: int | None = None,
        eval_at_start: bool = True,
        log_dir: str | Path | None = None,
        log_interval: int = 1000,
        checkpoint_dir: str | Path | None = None,
        checkpoint_interval: int = 10_000,
        keep_checkpoints: int = 3,
        snapshot_interval: int = 0,
        num_workers: int = 1,
        collector_backend: Literal["local", "ray"] = "local",
        ray_init_config: Mapping[str, Any] | None = None,
        replay_memmap: bool = False,
        replay_whole_episodes: bool = False,
        device: torch.device | str | None = None,
        task: str | None = None,
        planner_name: str | None = None,
        progress_bar: bool = False,
        verbose: bool = True,
        learner_backend: Literal["local", "ray"] = "local",
    ) -> None:
        if learner_backend != "local":
            # TorchRL's remote learner samples a flat batch and runs the stepper in Ray actors; the planner
            # needs the new weights before the very next step (UTD 1), and the seed-phase pre-training burst
            # is scheduled by optim_steps below, which the remote path bypasses. See docs/scaling.md.
            raise NotImplementedError(
                f"learner_backend={learner_backend!r} is not supported by DreamMPCTrainer (only 'local'); "
                "see docs/scaling.md for what TorchRL's Ray learner would need."
            )
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}.")
        if collector_backend not in ("local", "ray"):
            raise ValueError(f"collector_backend must be 'local' or 'ray', got {collector_backend!r}.")
        _check_positive("total_frames", total_frames)
        _check_positive("batch_size", batch_size)
        _check_positive("horizon", horizon)
        _check_positive("frames_per_batch", frames_per_batch)
        _check_positive("num_workers", num_workers)
        _check_positive("log_interval", log_interval)
        _check_positive("checkpoint_interval", checkpoint_interval)
        _check_positive("keep_checkpoints", keep_checkpoints)
        if buffer_capacity is not None:
            _check_positive("buffer_capacity", buffer_capacity)
            if buffer_capacity < horizon:
                raise ValueError(f"buffer_capacity={buffer_capacity} cannot hold one sub-trajectory of "
                                 f"horizon={horizon} transitions.")
        _check_plans_over("actor", actor, world_model)
        for name, eval_actor in dict(eval_actors or {}).items():
            _check_plans_over(f"eval_actors[{name!r}]", eval_actor, world_model)
        check_float("lr", lr, low=0.0, low_open=True)
        check_float("utd_ratio", utd_ratio, low=0.0, low_open=True)
        if eval_interval < 0:
            raise ValueError(f"eval_interval must be >= 0, got {eval_interval}.")
        if isinstance(snapshot_interval, bool) or not isinstance(snapshot_interval, int) or snapshot_interval < 0:
            raise ValueError(f"snapshot_interval must be an integer >= 0, got {snapshot_interval!r}.")
        if snapshot_interval and log_dir is None:
            raise ValueError("snapshot_interval > 0 needs a log_dir (snapshots go to <log_dir>/snapshots).")

        # A recurrent model carries its state in the env's tensordict: its envs need the model's transforms.
        create_env_fn = with_transforms(create_env_fn, world_model.acting_transforms())
        if create_eval_env_fn is not None:
            create_eval_env_fn = with_transforms(create_eval_env_fn, world_model.acting_transforms())
        # One env instance: specs are checked against the model, the seed phase is sized from its episode
        # length, and the single-process collector steps this very env.
        env = create_env_fn()
        try:
            obs_dim, action_dim = _env_dims(env)
            if (obs_dim, action_dim) != (world_model.obs_dim, world_model.action_dim):
                raise ValueError(
                    f"The env gives observation width {obs_dim} and action width {action_dim}, but the world "
                    f"model was built for observation width {world_model.obs_dim} and action width "
                    f"{world_model.action_dim}."
                )
            if episode_length is None:
                episode_length = _episode_length(env)
            if seed_frames is None:
                if episode_length is None:
                    raise ValueError("Pass episode_length (or seed_frames): the env does not report its episode "
                                     "length.")
                seed_frames = seed_steps(episode_length)
            if seed_frames < 1:
                raise ValueError(f"seed_frames must be >= 1 (the first update needs data), got {seed_frames}.")
            if total_frames <= seed_frames:
                raise ValueError(
                    f"total_frames={total_frames} does not exceed the seed phase ({seed_frames} random-action "
                    "steps): training would never act with the planner."
                )
        except Exception:
            env.close()
            raise
        self.seed_frames = int(seed_frames)
        self.pretrain_updates = self.seed_frames if pretrain_updates is None else int(pretrain_updates)
        if self.pretrain_updates < 0:
            raise ValueError(f"pretrain_updates must be >= 0, got {pretrain_updates}.")
        self.episode_length = episode_length
        self.pretraining = False  # True during the seed-phase pre-training burst (optim_steps)
        self._slice_losses: list | None = None  # (updates, mean losses) of each burst slice, while in one
        self.horizon = int(horizon)
        self.world_model = world_model
        self.actor = actor
        self.verbose = verbose
        self.num_workers = int(num_workers)
        self.collector_backend = collector_backend
        planner_name = planner_name or type(actor).__name__
        # TD-MPC2 sizes its buffer min(steps, 1M); it is stored in the fingerprint because a resumed run must
        # reuse the capacity of the checkpoint's storage (pass buffer_capacity to extend a run).
        if buffer_capacity is None:
            buffer_capacity = min(total_frames, 1_000_000)
        self.fingerprint = {
            "task": task,
            "algorithm": algorithm,
            "model_size": world_model.config.model_size,
            "obs_dim": world_model.obs_dim,
            "action_dim": world_model.action_dim,
            "planner": planner_name,
            "horizon": int(horizon),
            "batch_size": int(batch_size),
            "buffer_capacity": int(buffer_capacity),
            "world_model": dataclasses.asdict(world_model.config),
        }
        if device is None:
            device = next(world_model.parameters()).device
        # TD-MPC2 acts with the model in eval mode (Q dropout off); the stepper switches to train() per update.
        world_model.eval()

        # -- collector -------------------------------------------------------------------------------------
        collector = self._make_collector(
            env, create_env_fn, actor, total_frames, frames_per_batch, ray_init_config
        )

        # -- replay, losses, stepper -------------------------------------------------------------------------
        self.log_dir = None if log_dir is None else Path(log_dir)
        # Several workers interleave their rows in the storage: trajectories are then rebuilt from
        # (trajectory id, step count) pairs rather than from storage adjacency.
        fragmented = type(collector) is not Collector
        scratch_dir = None if self.log_dir is None else self.log_dir / "replay"
        if replay_memmap and scratch_dir is not None and scratch_dir.is_dir():
            # Left by an earlier (killed or finished) run of this log_dir: scratch space, the buffer's content is in
            # the checkpoints. TorchRL's memmap storage refuses to restore a checkpoint over existing files.
            shutil.rmtree(scratch_dir)
        update = UPDATE_BUILDERS[algorithm](
            world_model, lr=lr, enc_lr_scale=enc_lr_scale, grad_clip=grad_clip, tau=tau, compile=compile,
            loss_kwargs=dict(loss_kwargs or {}), policy_loss_kwargs=dict(policy_loss_kwargs or {}),
            **dict(algorithm_kwargs or {}))
        loss_module, stepper = update.loss_module, update.stepper
        # The stored rows differ (a stream id and "is_init"): a run resumes only with the replay it was written with.
        self.fingerprint["replay_across_episodes"] = update.replay_stream_key is not None
        self.fingerprint["replay_context"] = update.replay_context_key is not None
        self.fingerprint["replay_online"] = update.replay_online
        if update.replay_stream_key is not None and (fragmented or replay_whole_episodes):
            raise ValueError("A replay across episode ends (replay_across_episodes) reads one env's steps in the order "
                             "they were collected: it needs num_workers=1 and replay_whole_episodes=False.")
        replay_buffer = make_replay_buffer(
            buffer_capacity,
            horizon,
            batch_size,
            memmap=replay_memmap,
            scratch_dir=scratch_dir,
            traj_key=update.replay_stream_key or TRAJ_KEY,
            fragmented=fragmented,
            online=update.replay_online,
        )

        # -- logging ---------------------------------------------------------------------------------------
        logger = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            logger = MultiLogger(
                [
                    TensorboardLogger(exp_name="tb", log_dir=str(self.log_dir)),
                    CSVLogger(exp_name="csv", log_dir=str(self.log_dir)),
                ]
            )

        # -- checkpoints -----------------------------------------------------------------------------------
        checkpoint = rotation = None
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        if self.checkpoint_dir is not None:
            checkpoint = Checkpoint(format="directory")
            checkpoint.register("rng", GlobalRNGState())
            if type(collector) is Collector:
                # Registered first so the Trainer does not add the whole collector state (which repeats the
                # planner's weights, i.e. the world model, already saved through the loss module).
                checkpoint.register("collector", CollectorCountersState(collector))
            rotation = CheckpointRotation(self.checkpoint_dir, keep_last=int(keep_checkpoints))

        super().__init__(
            collector=collector,
            total_frames=int(total_frames),
            frame_skip=1,
            optim_steps_per_batch=1,
            loss_module=loss_module,
            optimization_stepper=stepper,
            replay_buffer=replay_buffer,
            batch_size=batch_size,
            logger=logger,
            progress_bar=progress_bar,
            seed=seed,
            save_trainer_interval=int(checkpoint_interval),
            log_interval=int(log_interval),
            checkpoint=checkpoint,
            checkpoint_rotation=rotation,
            checkpoint_metadata=(lambda trainer: {"fingerprint": trainer.fingerprint}) if rotation else None,
        )

        # -- hooks (registration order is execution order within a stage) -----------------------------------
        self.replay_hook = SliceReplayBufferTrainer(
            replay_buffer, horizon, device=device,
            keys=REPLAY_KEYS + tuple(update.replay_keys) + ((STEP_KEY,) if fragmented else ()),
            preprocess=update.replay_preprocess, whole_episodes=replay_whole_episodes,
        )
        self.replay_hook.register(self)
        self.algorithm_hooks = list(update.hooks)  # the algorithm's own (BMPC: the lazy reanalyze)
        for hook in self.algorithm_hooks:  # registered after the replay hook: they see the [B, H] sample
            hook.register(self)
        self.update_schedule = _UpdateSchedule(utd_ratio, self.pretrain_updates)
        self.update_schedule.register(self)
        if type(collector) is not Collector:
            # Worker processes / Ray actors hold their own copy of the planner: push the weights once before
            # collection starts and after every batch. (The in-process Collector acts with the trained modules
            # themselves.)
            self.register_op("setup", functools.partial(collector.update_policy_weights_, actor))
            UpdateWeights(collector, update_weights_interval=1).register(self)
        EpisodeReturnLogger().register(self)
        if getattr(actor, "diagnostics", False):  # planner.diagnostics=true: its entries logged as planner/<name>
            PlannerDiagnosticsLogger(int(log_interval)).register(self)
        self.snapshots = None
        if snapshot_interval:
            # Registered before the evaluation hook: the snapshot of step N is the model evaluated at step N.
            self.snapshots = WorldModelSnapshots(world_model, self.log_dir / "snapshots", int(snapshot_interval))
            self.snapshots.register(self)
        self.evaluation = None
        if eval_interval or eval_actors:
            eval_actors = dict(eval_actors) if eval_actors else {planner_name: actor}
            self.evaluation = EvaluationHook(
                eval_actors,
                create_eval_env_fn or create_env_fn,
                interval=int(eval_interval),
                episodes=int(eval_episodes),
                seed=seed + 1000 if eval_seed is None else int(eval_seed),
                csv_path=None if self.log_dir is None else self.log_dir / "eval.csv",
                at_start=eval_at_start,
                verbose=verbose,
            )
            self.evaluation.register(self)
        self.register_op("post_steps_log", self._log_throughput)
        self.register_op("setup", self._progress_bar_from_resumed_step)
        # Last of the setup ops: the snapshot and evaluation hooks have read their resumed state by then.
        self.register_op("setup", self._finish_stopped_pretraining)
        self.register_op("shutdown", self._on_shutdown)
        self._throughput_mark: tuple[float, int] | None = None

    # ------------------------------------------------------------------------------------------------------
    def _make_collector(self, env, create_env_fn, actor, total_frames, frames_per_batch, ray_init_config):
        n = self.num_workers
        if self.collector_backend == "ray":
            from torchrl.collectors.distributed import RayCollector

            env.close()
            return RayCollector(
                [create_env_fn] * n,
                actor,
                frames_per_batch=frames_per_batch * n,
                total_frames=total_frames,
                # RayCollector gives each of its collectors init_random_frames // n.
                init_random_frames=self.seed_frames,
                num_collectors=n,
                sync=True,
                ray_init_config=dict(ray_init_config or {}),
            )
        if n == 1:
            # No policy_device: the collector keeps `actor` itself (TorchRL copies a policy only to move it to
            # another device), so planning reads the weights the stepper has just updated.
            return Collector(
                env,
                actor,
                frames_per_batch=frames_per_batch,
                total_frames=total_frames,
                init_random_frames=self.seed_frames,
            )
        env.close()
        return MultiSyncCollector(
            [create_env_fn] * n,
            actor,
            frames_per_batch=frames_per_batch * n,
            total_frames=total_frames,
            # Each worker takes init_random_frames random steps of its own: split the seed phase between them.
            init_random_frames=math.ceil(self.seed_frames / n),
            cat_results="stack",
        )

    # ------------------------------------------------------------------------------------------------------
    #: Updates of the pre-training burst between two looks at a stop request (SIGTERM, :meth:`request_stop`):
    #: TD-MPC2's burst is as long as the seed phase (5,000 updates on HumanoidBench, ~10 min on a CPU core), which
    #: a preempted run cannot wait for.
    PRETRAIN_SLICE = 100

    def optim_steps(self, batch: TensorDictBase) -> None:
        """TD-MPC2's update schedule: nothing during the seed phase, ``pretrain_updates`` updates once at its
        end, then ``utd_ratio`` updates per collected step. The burst runs in slices of :attr:`PRETRAIN_SLICE`
        and stops at a stop request; the checkpoint written then records what is left (and the updates the
        stopped batch owes, in the schedule's credit), and the resumed run does the rest of the burst before any
        other update: the run's update count is the uninterrupted run's."""
        self.pretraining = False
        if self.collected_frames < self.seed_frames:
            return
        schedule = self.update_schedule
        if schedule.pretrain_left is None:
            schedule.pretrain_left = schedule.infer_pretrain_left(self.pretrain_updates, self._optim_count)
        frames = batch.get(("collector", "mask"), None)
        frames = int(frames.sum()) if frames is not None else batch.numel()
        # The batch that ends the seed phase owes the burst alone (TD-MPC2); a later one that finds a burst left
        # (a resumed run) owes its own updates too.
        ends_seed_phase = self.collected_frames - frames < self.seed_frames
        owed = 0 if ends_seed_phase and schedule.pretrain_left > 0 else schedule(frames)
        if schedule.pretrain_left > 0:
            self._pretrain(batch)
            if schedule.pretrain_left:  # stopped: this batch's updates wait in the (checkpointed) credit
                schedule.credit += owed
                return
        if owed > 0:
            self._run_updates(batch, owed)

    @property
    def pretrain_pending(self) -> bool:
        """Whether the seed phase is over but its pre-training burst is not (stopped inside it): the model is
        half pre-trained, and the evaluation and snapshot hooks wait for the burst's end."""
        left = self.update_schedule.pretrain_left
        return self.collected_frames >= self.seed_frames and bool(left)

    def _finish_stopped_pretraining(self) -> None:
        """Setup op of a run resumed inside the pre-training burst: the rest of the burst before anything is
        collected, then what the step that ended the seed phase put off until the burst's end (its snapshot and
        evaluation, if due, and the weights pushed to collector workers). The resumed run so collects its next
        step with the pre-trained model and names the snapshot and evaluation by the step the uninterrupted run
        names them by. The rest of that step's post-steps stage is not run again: it ran before the stop. A run
        stopped again inside this rest leaves :meth:`train` before its loop collects a step (TorchRL's loop
        collects first and looks at a stop request after), with a checkpoint of what is still left."""
        if not self.pretrain_pending:
            return
        self._pretrain(None)  # the updates sample from the replay buffer: no collected batch is read
        if self.pretrain_pending:
            raise _StoppedBeforeCollecting
        if type(self.collector) is not Collector:
            self.collector.update_policy_weights_(self.actor)
        for deferred in (self.snapshots, self.evaluation):
            if deferred is not None:
                deferred()
        # The checkpoint at this step has the burst pending: replace it (same name), so that a run killed before
        # its next checkpoint does not redo the burst and the evaluation.
        self.save_trainer(force_save=True)

    def train(self) -> None:
        """TorchRL's :meth:`~torchrl.trainers.Trainer.train`, left before any step is collected when a resumed
        run is stopped again inside the rest of its pre-training burst (see :meth:`_finish_stopped_pretraining`):
        then the run checkpoints, shuts down as at any stop, and the next resume does what is left."""
        try:
            super().train()
        except _StoppedBeforeCollecting:
            self.save_trainer(force_save=True)
            self._shutdown_hook()
            self.collector.shutdown()

    def _pretrain(self, batch: TensorDictBase | None) -> None:
        """What is left of the pre-training burst, in slices, up to a stop request; its losses logged once, when
        it ends (stopped, the mean of the part done waits in the checkpoint)."""
        schedule = self.update_schedule
        if self.verbose:
            resumed = schedule.pretrain_left < self.pretrain_updates
            print(f"[train] seed phase done ({self.collected_frames} steps): "
                  + (f"pre-training resumed, {schedule.pretrain_left} of {self.pretrain_updates} updates left"
                     if resumed else f"pre-training with {self.pretrain_updates} updates"), flush=True)
        self.pretraining = True  # read by algorithms that skip parts of the update then (BMPC: the policy)
        done = schedule.pretrain_done
        self._slice_losses = [] if done is None else [done]
        try:
            while schedule.pretrain_left > 0 and not self._stop_training:
                updates = min(self.PRETRAIN_SLICE, schedule.pretrain_left)
                self._run_updates(batch, updates)
                schedule.pretrain_left -= updates
        finally:
            self.pretraining = False
            slices, self._slice_losses = self._slice_losses, None
        if slices:  # one log entry for the burst, as when it was one optim_steps call: the slices' mean
            total = sum(n for n, _ in slices)
            # in Python floats: a stopped part restored from its checkpoint and the slices on the model's device;
            # scalars only (TorchRL logs no other entry, e.g. DreamerV3's "replay_context")
            scalars = [key for key, value in slices[-1][1].items() if torch.as_tensor(value).numel() == 1]
            mean = {key: sum(float(losses[key]) * n for n, losses in slices) / total for key in scalars}
            if schedule.pretrain_left:
                schedule.pretrain_done = (total, mean)
            else:
                schedule.pretrain_done = None
                super()._post_optim_complete_log_hook(self._optim_count, TensorDict(mean))
        if schedule.pretrain_left and self.verbose:
            print(f"[train] pre-training stopped with {schedule.pretrain_left} of {self.pretrain_updates} updates "
                  "left (stop requested): the resumed run does them first", flush=True)

    def _post_optim_complete_log_hook(self, optim_steps: int, average_losses: TensorDictBase | None) -> None:
        # TorchRL logs each optim_steps call's mean losses here; a burst slice's are kept for one log at its end
        # (Trainer._log skips entries within log_interval frames of its last: of the slices, all at one step,
        # only the first would be logged).
        if self._slice_losses is not None:
            if average_losses is not None:
                self._slice_losses.append((self.optim_steps_per_batch, average_losses))
            return
        super()._post_optim_complete_log_hook(optim_steps, average_losses)

    def _run_updates(self, batch: TensorDictBase, updates: int) -> None:
        self.optim_steps_per_batch = updates
        try:
            super().optim_steps(batch)
        except NonFiniteUpdateError:
            # Training stops here (see TDMPC2OptimizationStepper): release the collector's workers / envs first.
            self.collector.shutdown()
            raise

    def save_trainer(self, force_save: bool = False) -> None:
        """Checkpoints on multiples of ``checkpoint_interval`` (and at the end), not ``interval`` after the last."""
        if not self._has_checkpoint_destination():
            return
        due = self.collected_frames // self.save_trainer_interval > self._last_save // self.save_trainer_interval
        if force_save or due:
            self._last_save = self.collected_frames
            self._save_trainer()
            if self.verbose:
                print(f"[train] checkpoint at step {self.collected_frames}", flush=True)

    def _log(self, log_pbar=False, **kwargs) -> None:
        super()._log(log_pbar=log_pbar, **kwargs)
        # Trainer._log keeps every value ever logged in memory (one list entry per key per update): a 1M-step
        # run would hold millions of scalars. Only the latest value is needed (progress bar).
        for key in kwargs:
            del self._log_dict[key][:-1]

    def _log_throughput(self, batch: TensorDictBase | None = None) -> None:
        now, frames = time.perf_counter(), self.collected_frames
        mark = self._throughput_mark
        if mark is None:
            self._throughput_mark = (now, frames)
            return None
        if frames - mark[1] < self._log_interval:
            return None
        sps = (frames - mark[1]) / max(now - mark[0], 1e-9)
        self._throughput_mark = (now, frames)
        if self.verbose and not self.progress_bar:
            print(f"[train] step {frames}/{self.total_frames}  {sps:.1f} steps/s", flush=True)
        # Straight to the logger: Trainer._log keeps a key only once *more* than log_interval frames have passed
        # since it last kept it, which would drop every second of these (they come exactly log_interval apart).
        if self.logger is not None:
            self.logger.log_scalar("time/steps_per_second", sps, step=frames)

    def _progress_bar_from_resumed_step(self) -> None:
        # TorchRL's Trainer.train opens its bar at 0 of total_frames; a resumed run's bar starts at the step it
        # resumed from (as TorchRL's own Ray-backend loop does with `initial=collected_frames`).
        pbar = getattr(self, "_pbar", None)
        if pbar is not None and self.collected_frames and pbar.n == 0:
            pbar.close()
            self._pbar = type(pbar)(total=self.total_frames, initial=self.collected_frames)

    def _on_shutdown(self) -> None:
        if self.log_dir is not None:
            from torchrl_dreammpc.checkpoints import save_world_model

            save_world_model(self.world_model, self.log_dir / "world_model.pt")
        if self.logger is not None:
            self.logger.flush()

    # ------------------------------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint in ``checkpoint_dir`` (``None`` if there is none)."""
        return None if self.checkpoint_rotation is None else self.checkpoint_rotation.latest()

    def check_fingerprint(self, path: str | Path) -> None:
        """Refuses a checkpoint written for another task, model size, observation/action width or planner.

        Reads the checkpoint's manifest only (no payload is loaded).

        Raises:
            ConfigMismatchError: naming every field that differs, with both values.
        """
        saved = read_fingerprint(path)
        diffs = [
            f"{key}: checkpoint has {saved.get(key, FINGERPRINT_DEFAULTS.get(key))!r}, this run has "
            f"{self.fingerprint[key]!r}"
            for key in FINGERPRINT_KEYS
            if saved.get(key, FINGERPRINT_DEFAULTS.get(key)) != self.fingerprint[key]
        ]
        saved_wm, wm = saved.get("world_model", {}), self.fingerprint["world_model"]
        diffs += [
            f"world_model.{key}: checkpoint has {saved_wm.get(key)!r}, this run has {wm[key]!r}"
            for key in wm
            if key not in FINGERPRINT_KEYS and saved_wm.get(key) != wm[key]
        ]
        if diffs:
            hint = (" (the default capacity is min(steps, 1M): pass the checkpoint's buffer_capacity to extend a run)"
                    if saved.get("buffer_capacity") != self.fingerprint["buffer_capacity"] else "")
            raise ConfigMismatchError(f"Refusing to resume from {path}: it was written by another run config. "
                                      + "; ".join(diffs) + hint)

    def resume(self, path: str | Path | None = None) -> Path | None:
        """Continues from a checkpoint (by default the newest complete one in ``checkpoint_dir``).

        Restores the model, optimizers, Q scale, replay buffer, step counters, collector counters, RNG state,
        logger and evaluation state, after checking the fingerprint (:meth:`check_fingerprint`) and that every
        file of the checkpoint is there and whole (:func:`verify_checkpoint_files`) before anything is loaded. Staging directories left by a run killed while saving are removed first (they are never
        considered: a checkpoint is only published, by an atomic rename, once complete). Log rows written
        after the checkpoint (``eval.csv``, CSV scalars, TensorBoard events) are dropped, so the resumed run
        writes them again. Without a checkpoint (a run killed before its first one, restarted in the same
        directory) the run starts afresh and the rows of the earlier attempt are dropped too (otherwise
        ``eval.csv`` would hold step 0 twice); each trimmed CSV file is first copied to ``<name>.before-restart``.

        Returns:
            the checkpoint restored, or ``None`` when there is none (a fresh start).
        """
        if path is None:
            if self.checkpoint_dir is None:
                raise ValueError("resume() needs a checkpoint_dir (or an explicit path).")
            self._remove_stale_staging()
            path = self.latest_checkpoint()
            if path is None:
                self.start_afresh()
                return None
        path = Path(path)
        self.check_fingerprint(path)
        verify_checkpoint_files(path)
        self.load_from_file(path)
        step = self.collected_frames
        self._truncate_logs_after(step)
        if self.pretrain_pending:
            # No evaluation is made while the burst is pending: one at this step was made by a later attempt that
            # finished the burst and died before its checkpoint (_finish_stopped_pretraining) replaced this one.
            self._truncate_logs_after(step - 1, under="eval")
        self.world_model.eval()
        if self.verbose:
            print(f"[train] resumed from {path} at step {step}", flush=True)
        return path

    def start_afresh(self) -> None:
        """Drops the log rows (``eval.csv``, CSV scalars, TensorBoard events) that an earlier attempt without a
        checkpoint left in ``log_dir``, each trimmed CSV file first copied to ``<name>.before-restart``: a run
        started from step 0 in a used directory (``resume=false``, or :meth:`resume` finding no checkpoint) would
        otherwise append a second curve to the first."""
        self._truncate_logs_after(-1, keep_copy=True)

    def _truncate_logs_after(self, step: int, keep_copy: bool = False, under: str | None = None) -> None:
        """Drops log rows after ``step``: ``eval.csv`` and the logger's scalars (``under``: only those under that
        name, see :meth:`MultiLogger.truncate_after`)."""
        if isinstance(self.logger, MultiLogger):
            self.logger.truncate_after(step, keep_copy=keep_copy, under=under)
        if self.evaluation is not None:
            self.evaluation.truncate_after(step, keep_copy=keep_copy)

    def _remove_stale_staging(self) -> None:
        if self.checkpoint_dir is None or not self.checkpoint_dir.is_dir():
            return
        prefix = f".{self.checkpoint_rotation.prefix}-"
        for entry in self.checkpoint_dir.iterdir():
            if entry.name.startswith(prefix) and any(tag in entry.name for tag in (".stage-", ".delete-", ".backup-",
                                                                                   ".archive-")):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_plans_over(name: str, actor, world_model) -> None:
    """Refuses an actor that does not act through ``world_model``: collecting (or evaluating) with a planner over
    another model would use a model that this trainer never updates."""
    modules = actor.modules() if isinstance(actor, torch.nn.Module) else ()
    if not any(module is world_model for module in modules):
        held = getattr(actor, "world_model", None)
        detail = (f"it plans over another {type(held).__name__} instance" if held is not None
                  else "the world model is not among its submodules")
        raise ValueError(f"{name} ({type(actor).__name__}) must act through the world model being trained: {detail}. "
                         "Build the planner over the very model passed as world_model=.")


def _env_dims(env: EnvBase) -> tuple[int, int]:
    obs_spec = env.observation_spec["observation"]
    return int(obs_spec.shape[-1]), int(env.action_spec.shape[-1])


def _episode_length(env: EnvBase) -> int | None:
    base = getattr(env, "base_env", env)
    info = getattr(base, "info", None)
    return getattr(info, "episode_length", None)
