"""Trainer hooks and small adapters used by :class:`~torchrl_dreammpc.trainers.DreamMPCTrainer`."""
from __future__ import annotations

import contextlib
import csv
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase
from torch import nn
from torchrl.collectors import Collector, Evaluator
from torchrl.envs import StepCounter, Transform, TransformedEnv
from torchrl.envs.utils import ExplorationType
from torchrl.record.loggers import CSVLogger, Logger, TensorboardLogger
from torchrl.trainers import Trainer, TrainerHookBase

from torchrl_dreammpc.planners.base import LatentPlannerBase

__all__ = [
    "CollectorCountersState",
    "EpisodeReturnLogger",
    "EvaluationHook",
    "EvaluationProgress",
    "MultiLogger",
    "WorldModelSnapshots",
    "read_eval_csv",
    "trim_csv_rows",
]


class MultiLogger(Logger):
    """Fans every logging call out to several TorchRL loggers (the Trainer accepts a single one).

    Used to write TensorBoard events and CSV scalars at once. Its state dict is the list of its children's, so
    the Trainer's checkpoint restores every child.

    Args:
        loggers (sequence of Logger): the children, e.g. ``[TensorboardLogger(...), CSVLogger(...)]``.

    Examples:
        >>> import tempfile
        >>> from torchrl.record.loggers import CSVLogger
        >>> with tempfile.TemporaryDirectory() as d:
        ...     logger = MultiLogger([CSVLogger("run", d), CSVLogger("copy", d)])
        ...     logger.log_scalar("x", 1.0, step=0)
    """

    def __init__(self, loggers: Sequence[Logger]) -> None:
        if not loggers:
            raise ValueError("MultiLogger needs at least one logger.")
        self.loggers = list(loggers)
        super().__init__(exp_name=self.loggers[0].exp_name, log_dir=self.loggers[0].log_dir)

    def _create_experiment(self):
        return None

    def log_scalar(self, name: str, value: float, step: int | None = None) -> None:
        value = float(value)
        for logger in self.loggers:
            logger.log_scalar(name, value, step=step)

    def log_video(self, name: str, video: torch.Tensor, step: int | None = None, **kwargs) -> None:
        for logger in self.loggers:
            logger.log_video(name, video, step=step, **kwargs)

    def log_hparams(self, cfg) -> None:
        for logger in self.loggers:
            logger.log_hparams(cfg)

    def log_histogram(self, name: str, data: Sequence, **kwargs):
        for logger in self.loggers:
            if not isinstance(logger, CSVLogger):  # CSVLogger refuses histograms
                logger.log_histogram(name, data, **kwargs)

    def flush(self, timeout: float | None = None) -> None:
        for logger in self.loggers:
            logger.flush()

    def shutdown(self, timeout: float | None = None) -> None:
        for logger in self.loggers:
            logger.shutdown()
        self._service_shutdown = True

    def state_dict(self) -> dict[str, Any]:
        return {"loggers": [logger.state_dict() for logger in self.loggers]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        states = state_dict["loggers"]
        if len(states) != len(self.loggers):
            raise ValueError(f"Checkpoint holds {len(states)} logger states, this MultiLogger has {len(self.loggers)}.")
        for logger, state in zip(self.loggers, states):
            logger.load_state_dict(state)

    def truncate_after(self, step: int, keep_copy: bool = False, under: str | None = None) -> None:
        """Forgets what was logged after ``step`` (used when a killed run resumes from the checkpoint at ``step``).

        CSV scalar files lose their rows with a larger step (``keep_copy``: see :func:`trim_csv_rows`); TensorBoard
        is reopened with ``purge_step=step + 1`` so the events written after the checkpoint are hidden.
        ``under``: only the CSV scalars whose name starts with ``under + "/"`` (TensorBoard, which can only
        purge every tag at once, is left as it is).
        """
        for logger in self.loggers:
            if isinstance(logger, CSVLogger):
                scalars = Path(logger.experiment.log_dir) / "scalars"
                for file in (scalars / under if under else scalars).rglob("*.csv"):
                    handle = logger.experiment.files.pop(str(file), None)
                    if handle is not None:
                        handle.close()
                    trim_csv_rows(file, step, header=False, keep_copy=keep_copy)
                for name, rows in logger.experiment.scalars.items():
                    if under is None or name.startswith(under + "/"):
                        rows[:] = [row for row in rows if row[0] <= step]
            elif under is not None:
                continue
            elif isinstance(logger, TensorboardLogger):
                from torch.utils.tensorboard import SummaryWriter

                logger.experiment.close()
                logger.experiment = SummaryWriter(log_dir=logger.log_dir, purge_step=step + 1)

    def __repr__(self) -> str:
        return f"MultiLogger({self.loggers})"


def trim_csv_rows(path: str | Path, step: int, *, header: bool, keep_copy: bool = False) -> None:
    """Rewrites a ``step,value...`` CSV file keeping only the rows whose step is ``<= step`` (atomically).

    ``keep_copy``: when rows are dropped, the whole file is first copied to ``<name>.before-restart`` (``-2``,
    ``-3``, ... if that exists), so the dropped rows stay on disk.
    """
    path = Path(path)
    if not path.exists():
        return
    with path.open(newline="") as file:
        rows = list(csv.reader(file))
    head, body = (rows[:1], rows[1:]) if header else ([], rows)
    kept = [row for row in body if row and float(row[0]) <= step]
    if keep_copy and len(kept) < len([row for row in body if row]):
        copy, n = path.with_name(path.name + ".before-restart"), 1
        while copy.exists():
            n += 1
            copy = path.with_name(f"{path.name}.before-restart-{n}")
        shutil.copy2(path, copy)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as file:
        csv.writer(file).writerows(head + kept)
    os.replace(tmp, path)


def read_eval_csv(path: str | Path) -> list[tuple[int, float]]:
    """Reads an ``eval.csv`` learning curve as ``[(step, return), ...]``."""
    with Path(path).open(newline="") as file:
        reader = csv.DictReader(file)
        return [(int(float(row["step"])), float(row["return"])) for row in reader]


class CollectorCountersState:
    """Checkpoint view of a single-process :class:`~torchrl.collectors.Collector` without the policy weights.

    ``Collector.state_dict()`` holds the policy's full state dict next to its frame counter and trajectory-id
    pool. The planner's weights are the world model's, which the Trainer already checkpoints through its loss
    module, so storing them again would double the checkpoint of a large model. This view keeps the counters
    (``frames``, ``iter``, ``traj_pool``: resumed trajectory ids stay unique) and the env transforms' state.

    Other collectors (multi-process, Ray) are checkpointed whole.
    """

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.collector.state_dict())
        state.pop("policy_state_dict", None)
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.collector.load_state_dict(dict(state_dict), strict=False)


class EpisodeReturnLogger(TrainerHookBase):
    """Logs the return of every finished training episode (``train/episode_return``) at the frame it ends.

    The Trainer's own ``_log`` keeps a value only when ``log_interval`` frames have passed since that key was
    last logged, which would drop most episodes; this hook writes to the logger directly.

    Args:
        episode_reward_key (NestedKey): the env's running return (:class:`~torchrl.envs.RewardSum`).
    """

    def __init__(self, episode_reward_key=("next", "episode_reward"), done_key=("next", "done")) -> None:
        self.episode_reward_key = episode_reward_key
        self.done_key = done_key
        self.episodes = 0
        self._trainer: Trainer | None = None

    def __call__(self, batch: TensorDictBase) -> None:
        trainer = self._trainer
        done = batch.get(self.done_key, None)
        if done is None or trainer is None or not bool(done.any()):
            return None
        returns = batch.get(self.episode_reward_key, None)
        if returns is None:
            return None
        finished = returns[done].reshape(-1)
        self.episodes += finished.numel()
        if trainer.logger is not None:
            trainer.logger.log_scalar("train/episode_return", float(finished.mean()), step=trainer.collected_frames)
            trainer.logger.log_scalar("train/episodes", float(self.episodes), step=trainer.collected_frames)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"episodes": self.episodes}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.episodes = int(state_dict["episodes"])

    def register(self, trainer: Trainer, name: str = "episode_return_logger") -> None:
        self._trainer = trainer
        trainer.register_op("pre_steps_log", self)
        trainer.register_module(name, self)


def _diagnostics(entries: TensorDictBase):
    """``(name, tensor)`` for every leaf of a planner's ``("planner", ...)`` entries (nested names joined by ``/``)."""
    for name, value in entries.items(include_nested=True, leaves_only=True):
        yield ("/".join(name) if isinstance(name, tuple) else name), value


class PlannerDiagnosticsLogger(TrainerHookBase):
    """Logs the acting planner's diagnostics as ``planner/<name>``: the mean of each ``("planner", name)`` entry
    (written with every action by a planner built with ``diagnostics=True``: Dream-MPC's objective before / after
    its gradient step, the chosen candidate, the uncertainty; MPPI's) over the steps collected since the last log,
    every ``interval`` steps. Batches without such entries, and those of the trainer's random-action seed phase
    (``trainer.seed_frames``), are ignored.

    Args:
        interval (int): steps between two logs (the trainer's ``log_interval``).
        key (NestedKey): where the planner writes its diagnostics. Default ``"planner"``.
    """

    def __init__(self, interval: int, key="planner") -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a positive integer, got {interval!r}.")
        self.interval, self.key = interval, key
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._last_log: int | None = None
        self._trainer: Trainer | None = None

    def __call__(self, batch: TensorDictBase) -> None:
        trainer = self._trainer
        entries = batch.get(self.key, None)
        # Seed-phase steps are random actions: TorchRL's collector leaves the planner's preallocated entries in
        # those batches, but the planner did not run.
        if trainer is None or entries is None or trainer.collected_frames <= getattr(trainer, "seed_frames", 0):
            return None
        for name, value in _diagnostics(entries):
            self._sums[name] = self._sums.get(name, 0.0) + float(value.float().sum())
            self._counts[name] = self._counts.get(name, 0) + value.numel()
        step = trainer.collected_frames
        if self._last_log is None:
            self._last_log = step - batch.numel()
        if step - self._last_log >= self.interval:
            if trainer.logger is not None:
                for name, total in self._sums.items():
                    trainer.logger.log_scalar(f"planner/{name}", total / self._counts[name], step=step)
            self._sums, self._counts, self._last_log = {}, {}, step
        return None

    def register(self, trainer: Trainer, name: str = "planner_diagnostics_logger") -> None:
        self._trainer = trainer
        trainer.register_op("pre_steps_log", self)


def _episode_metrics(traj_batch: TensorDictBase) -> dict[str, Any]:
    """Per-episode returns (and Meta-World's success flags with their rates) of an evaluation batch, and the
    planner's diagnostics averaged over its steps (``planner/<name>``, if the planner writes them).

    TorchRL's Evaluator reports the mean and std of the returns; paired comparisons of planners and bootstrap
    confidence intervals need every episode's value, so they are returned as lists (``episode_returns``,
    ``episode_successes``) beside the rates. An episode is a success (``episode_successes``, rate ``success``)
    when the env's ``"success"`` flag is set at its last step, as in TD-MPC2's evaluation (``info["success"]``
    after the final step); ``episode_successes_any`` / ``success_any``: set at any step.
    """
    reward = traj_batch.get(("next", "reward"))
    traj_ids = traj_batch.get(("collector", "traj_ids"), None)
    if traj_ids is None:
        episodes = [torch.arange(traj_batch.numel())]
    else:
        traj_ids = traj_ids.reshape(-1)
        episodes = [(traj_ids == i).nonzero().squeeze(-1) for i in traj_ids.unique(sorted=True)]
    reward = reward.reshape(traj_batch.numel(), -1)
    out: dict[str, Any] = {"episode_returns": [float(reward[rows].sum()) for rows in episodes],
                           "frames": traj_batch.numel()}  # the steps of the episodes kept
    success = traj_batch.get(("next", "success"), None)
    if success is not None:
        success = success.reshape(traj_batch.numel(), -1).any(-1)
        final = [bool(success[rows[-1]]) for rows in episodes]  # (rows: the episode's steps, in order)
        anywhere = [bool(success[rows].any()) for rows in episodes]
        out["episode_successes"], out["episode_successes_any"] = final, anywhere
        out["success"] = sum(final) / max(len(final), 1)
        out["success_any"] = sum(anywhere) / max(len(anywhere), 1)
    diagnostics = traj_batch.get("planner", None)
    if diagnostics is not None:
        for name, value in _diagnostics(diagnostics):
            out[f"planner/{name}"] = float(value.float().mean())
    return out


PROGRESS_MODES = ("auto", "bar", "lines", "off")


class EvaluationProgress:
    """Progress of one actor's evaluation episodes: a tqdm bar in a terminal, one plain line per episode in a log.

    A bar counts env steps when the episode length is known (elapsed, rate and estimated time left follow each step;
    an episode that ends early is counted as full, so the estimate stays an upper bound) and episodes otherwise;
    its postfix shows the episodes done and the last return. A line is printed when an episode ends:
    ``[eval] mppi: episode 3/10, return 812.3, 05:12 elapsed, ~12:08 left``.

    Args:
        mode (str or bool): ``"bar"``, ``"lines"``, ``"off"`` (or ``False``), or ``"auto"`` (or ``True``): a bar
            when ``file`` is a terminal, lines otherwise.
        file (text stream, optional): where to write. Default: ``sys.stderr`` for a bar (as tqdm), ``sys.stdout``
            for lines (with the other ``[eval]`` lines).

    Examples:
        >>> import io
        >>> out = io.StringIO()
        >>> progress = EvaluationProgress("lines", file=out)
        >>> progress.start("policy", episodes=2, episode_length=3)
        >>> for done in (False, False, True):
        ...     progress.step(done=int(done), episode_return=10.0 if done else None)
        >>> progress.close()
        >>> out.getvalue().startswith("[eval] policy: episode 1/2, return 10.0, 00:00 elapsed, ~00:00 left")
        True
    """

    def __init__(self, mode: str | bool = "auto", file=None) -> None:
        mode = {True: "auto", False: "off", None: "off"}.get(mode, mode)
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress must be one of {PROGRESS_MODES} (or a bool), got {mode!r}.")
        if mode == "auto":
            stream = file if file is not None else sys.stderr
            mode = "bar" if getattr(stream, "isatty", lambda: False)() else "lines"
        self.mode = mode
        self.file = file
        self._bar = None
        self._active = False
        self._name, self._episodes, self._length = "", 0, None
        self._done, self._steps_in_episode, self._start = 0, 0, 0.0
        self._counting = False
        #: Env steps played since the last :meth:`start`, whatever the mode, those the collector plays past the
        #: last episode included (they cost time but are not shown).
        self.steps_played = 0

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def start(self, name: str, episodes: int, episode_length: int | None = None) -> None:
        """Begins the evaluation of actor ``name`` (``episodes`` episodes of at most ``episode_length`` steps)."""
        self.close()
        self._name, self._episodes, self._length = name, int(episodes), episode_length
        self._done, self._steps_in_episode, self._start = 0, 0, time.perf_counter()
        self._active, self._counting, self.steps_played = self.enabled, True, 0
        if self.mode == "bar":
            from tqdm.auto import tqdm

            by_steps = episode_length is not None
            self._bar = tqdm(total=episodes * episode_length if by_steps else episodes,
                             unit="step" if by_steps else "episode", desc=f"[eval] {name}", leave=False,
                             file=self.file, dynamic_ncols=True, mininterval=0.5)
            self._bar.set_postfix_str(f"episodes 0/{episodes}", refresh=False)

    def step(self, done: int = 0, episode_return: float | None = None) -> None:
        """One env step; ``done`` episodes ended with it (``episode_return``: the return of one of them)."""
        self.steps_played += self._counting
        if not self._active or self._done >= self._episodes:
            # Steps outside an evaluation, or past its last episode (the collector polls whole chunks), are not shown.
            return
        self._steps_in_episode += 1
        bar, by_steps = self._bar, self._length is not None
        if bar is not None and by_steps:
            bar.update(1)
        if not done:
            return
        self._done += int(done)
        if bar is not None:
            # An early end counts the episode's remaining steps, so that n stays (episodes done) x length.
            bar.update(max(self._length - self._steps_in_episode, 0) + self._length * (done - 1) if by_steps
                       else done)
            last = "" if episode_return is None else f", last return {episode_return:.1f}"
            bar.set_postfix_str(f"episodes {self._done}/{self._episodes}{last}")
        elif self.mode == "lines":
            from tqdm import tqdm

            elapsed = time.perf_counter() - self._start
            left = elapsed / self._done * max(self._episodes - self._done, 0)
            ret = "" if episode_return is None else f", return {episode_return:.1f}"
            print(f"[eval] {self._name}: episode {self._done}/{self._episodes}{ret}, "
                  f"{tqdm.format_interval(elapsed)} elapsed, ~{tqdm.format_interval(left)} left",
                  file=self.file if self.file is not None else sys.stdout, flush=True)
        self._steps_in_episode = 0

    def close(self) -> None:
        self._active = self._counting = False
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class _ProgressTransform(Transform):
    """A pass-through transform that reports each env step (and the episodes it ends) to an
    :class:`EvaluationProgress`: TorchRL's Evaluator runs its episodes inside a collector with no per-step
    callback, and the env is the one place that sees every step and every episode end."""

    def __init__(self, progress: EvaluationProgress) -> None:
        super().__init__()
        self.progress = progress

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        done = next_tensordict.get("done", None)
        ended = 0 if done is None else int(done.sum())
        ret = next_tensordict.get("episode_reward", None) if ended else None
        self.progress.step(ended, None if ret is None else float(ret[done.expand_as(ret)].reshape(-1)[-1]))
        return next_tensordict


def _episode_length(env) -> int | None:
    """The agent steps of a full episode of ``env``, if its task says (our task envs' ``info.episode_length``)."""
    base = getattr(env, "base_env", env)
    info = getattr(base, "info", None)
    length = getattr(info, "episode_length", None)
    return int(length) if isinstance(length, int) else None


@contextlib.contextmanager
def _apart_from_the_caller(actor):
    """Runs the block (an evaluation of ``actor``) apart from what it interrupts, a training run for one:
    - on a fork of torch's global RNG (CPU, and every CUDA device already in use), so that the caller's stream is
      left as it was (otherwise the training after an evaluation depended on its episodes, actors and length);
    - with every planner in ``actor`` planning from a warm start of its own, its own put back on exit
      (:meth:`LatentPlannerBase.separate_warm_start`): the actor may be the training planner itself, whose next
      training step must go on from its own previous plan, not the evaluation's last one.
    """
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda), contextlib.ExitStack() as stack:
        if isinstance(actor, nn.Module):
            for module in actor.modules():
                if isinstance(module, LatentPlannerBase):
                    stack.enter_context(module.separate_warm_start())
        yield


def cap_episode_length(env, max_steps: int | None):
    """Ends every episode of ``env`` (truncated) after ``max_steps`` agent steps, on top of the task's own limit.

    Why not :class:`~torchrl.collectors.Evaluator`'s ``max_steps``: TorchRL drops its own cap when the env already
    counts steps, and every task env here does (the task's time limit), so the cap would be silently ignored.
    """
    if max_steps is None:
        return env
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer or None, got {max_steps!r}.")
    counter = StepCounter(max_steps=max_steps, step_count_key="capped_step_count")
    if isinstance(env, TransformedEnv):
        env.append_transform(counter)
        return env
    return TransformedEnv(env, counter)


class EvaluationHook(TrainerHookBase):
    """Periodic evaluation through :class:`torchrl.collectors.Evaluator`, with an ``eval.csv`` learning curve.

    At step 0 (``at_start``, as TD-MPC2), every ``interval`` collected frames, and at the last one, each named
    actor plays ``episodes`` episodes (to their end, or ``max_steps`` agent steps) in its own evaluation env, in TorchRL's
    ``ExplorationType.DETERMINISTIC`` mode (``exploration_type``). Before each evaluation the env is reseeded with
    ``seed``, so every evaluation (and every actor) starts from the same initial states.

    The first actor is the training planner: its mean return is appended as a ``step,return`` row to
    ``csv_path`` (``eval.csv``, the file the learning curve is plotted from). Other actors go to
    ``eval_<name>.csv``. Every metric is also logged (``eval/return``, ``eval/return_std``, ``eval/episode_length``,
    ``eval/ms_per_step`` (the collection time per env step played), ``eval/success`` and ``eval/success_any`` on Meta-World, ``eval/planner/<name>`` for a
    planner with diagnostics; ``eval/<name>/...`` for the other actors) and printed.

    The actors run in this process on the very modules being trained (no weight copy). The evaluator toggles
    ``actor.eval()`` / ``actor.train()`` around its rollouts; this hook restores the previous mode of every
    submodule afterwards (the world model's included), because TD-MPC2 acts with the world model in eval mode
    (Q dropout off) outside of updates.

    Args:
        actors (mapping str -> module): the actors to evaluate; the first one is the training planner.
        create_env_fn (callable): builds one evaluation env per actor.
        interval (int): frames between evaluations. ``0`` disables periodic evaluation.
        episodes (int): episodes per evaluation.
        seed (int): seed of the evaluation envs.
        csv_path (str or Path, optional): the ``eval.csv`` file. ``None`` writes no CSV.
        max_steps (int, optional): cap on the episode length (the task's own time limit applies anyway).
        at_start (bool): also evaluate at step 0, before any training (TD-MPC2 does). Default ``True``.
        verbose (bool): print one line per evaluation.
        progress (str or bool): progress within each actor's evaluation (:class:`EvaluationProgress`):
            ``"auto"`` / ``True`` (a tqdm bar in a terminal, one line per episode otherwise), ``"bar"``,
            ``"lines"``, or ``"off"`` / ``False`` (default: the training loop has its own output).
        exploration_type (ExplorationType): the mode the actors play in. Default ``DETERMINISTIC`` (the policy
            prior's mean, no exploration noise: TD-MPC2's evaluation); ``RANDOM`` evaluates the stochastic
            actors (e.g. the policy prior's samples).
        torch_seed (int, optional): seeds torch's global RNG before each actor's episodes, so that what the actors
            draw from it (Dream-MPC's prior candidates, MPPI's samples, a sampled action, a DreamerV3 posterior)
            is the same on a rerun, whatever the order of the actors. Default ``None``: each actor draws from a
            copy of the caller's stream as it stands. Either way the caller's stream is left as it was (the
            evaluation runs on a fork of torch's RNG): a training run's draws do not depend on how often, how
            long or with which actors it is evaluated.
        poll_steps (int): the most env steps the evaluation collector plays per poll (its ``frames_per_batch``,
            never more than one episode). It stops polling once it holds ``episodes`` complete episodes, so where
            episodes end early (HumanoidBench's falls) up to ``poll_steps - 1`` steps are played past the last one
            and dropped. Default ``100``: a poll costs well under a millisecond, an MPPI step on a humanoid
            hundreds.
    """

    def __init__(
        self,
        actors: Mapping[str, Callable],
        create_env_fn: Callable[[], Any],
        *,
        interval: int,
        episodes: int,
        seed: int,
        csv_path: str | Path | None = None,
        max_steps: int | None = None,
        at_start: bool = True,
        verbose: bool = True,
        progress: str | bool = False,
        exploration_type: ExplorationType = ExplorationType.DETERMINISTIC,
        torch_seed: int | None = None,
        poll_steps: int = 100,
    ) -> None:
        if not actors:
            raise ValueError("EvaluationHook needs at least one actor.")
        if interval < 0 or episodes < 1:
            raise ValueError(f"interval must be >= 0 and episodes >= 1, got interval={interval}, episodes={episodes}.")
        if isinstance(poll_steps, bool) or not isinstance(poll_steps, int) or poll_steps < 1:
            raise ValueError(f"poll_steps must be a positive integer, got {poll_steps!r}.")
        self.actors = dict(actors)
        self.names = list(self.actors)
        self.interval = int(interval)
        self.episodes = int(episodes)
        self.seed = int(seed)
        self.csv_path = None if csv_path is None else Path(csv_path)
        self.verbose = verbose
        self.at_start = bool(at_start)
        self.progress = EvaluationProgress(progress)
        self.max_steps = max_steps
        self.envs = {name: self._with_progress(cap_episode_length(create_env_fn(), max_steps)) for name in self.names}
        self.torch_seed = torch_seed
        self.evaluators = {
            name: Evaluator(
                self.envs[name],
                actor,
                num_trajectories=self.episodes,
                max_steps=max_steps,
                # The collector polls this many steps at a time until it holds `episodes` complete episodes, which
                # it assembles across polls; what it plays past the last one is dropped. TorchRL's default, 1000,
                # played a 2nd 500-step episode when one was asked for, and 2 Meta-World episodes of 100 steps
                # played 10 and kept 2; one episode per poll still played up to a whole humanoid episode of
                # planner calls for nothing after falls. At most `poll_steps`: less than that is wasted.
                frames_per_batch=min(self._episode_length(self.envs[name]) or poll_steps, poll_steps),
                collector_kwargs={"traj_format": "cat"},
                log_prefix="eval",
                exploration_type=exploration_type,
                metrics_fn=_episode_metrics,
            )
            for name, actor in self.actors.items()
        }
        for name, evaluator in self.evaluators.items():
            # Build each evaluator's collector now (TorchRL builds it lazily on the first evaluation, resetting
            # the env once more then): afterwards every evaluation sees the same seed -> reset sequence, so every
            # evaluation, and every actor, starts from the same initial states. (The collector calls the actor
            # once to read its outputs: on a fork of the RNG and a warm start of its own, as every evaluation.)
            ensure = getattr(getattr(evaluator, "_backend", None), "_ensure_collector", None)
            if callable(ensure):
                with _apart_from_the_caller(self.actors[name]):
                    ensure()
        self.next_eval = self.interval if self.interval else math.inf
        self.last_eval_step = -1
        self.history: list[tuple[int, dict[str, float]]] = []
        self._trainer: Trainer | None = None

    def _episode_length(self, env) -> int | None:
        """Agent steps of one full evaluation episode: the task's length, capped by ``max_steps``."""
        lengths = [n for n in (_episode_length(env), self.max_steps) if n]
        return int(min(lengths)) if lengths else None

    def _with_progress(self, env):
        # Attached whatever the progress mode: it also counts the steps played (for ms per step).
        transform = _ProgressTransform(self.progress)
        if isinstance(env, TransformedEnv):
            env.append_transform(transform)
            return env
        return TransformedEnv(env, transform)

    def csv_for(self, name: str) -> Path | None:
        if self.csv_path is None:
            return None
        if name == self.names[0]:
            return self.csv_path
        return self.csv_path.with_name(f"{self.csv_path.stem}_{name}{self.csv_path.suffix}")

    @torch.no_grad()
    def evaluate(self, step: int, on_result: Callable[[str, dict[str, float]], None] | None = None
                 ) -> dict[str, dict[str, float]]:
        """Evaluates every actor now and records the results at ``step``; returns ``{name: metrics}``.

        ``on_result(name, metrics)`` is called as soon as each actor is done (e.g. to print its row).
        """
        results = {}
        for name in self.names:
            actor, env = self.actors[name], self.envs[name]
            # Every submodule's mode, the shared world model's included: Evaluator ends with policy.train(),
            # which would otherwise leave the world model in train mode (Q dropout on) for the next training step.
            modes = [(m, m.training) for m in actor.modules()] if isinstance(actor, nn.Module) else []
            env.set_seed(self.seed)
            start = time.perf_counter()
            self.progress.start(name, self.episodes, self._episode_length(env))
            try:
                with _apart_from_the_caller(actor):
                    if self.torch_seed is not None:
                        torch.manual_seed(self.torch_seed)
                    raw = self.evaluators[name].evaluate(step=step)
            finally:
                self.progress.close()
            wall = time.perf_counter() - start
            for module, training in modes:
                module.training = training
            fps = float(raw.get("eval/fps", float("nan")))
            # TorchRL's fps divides the collection time by the steps of the episodes kept; the collector also plays
            # on to the end of its last poll (fewer than `poll_steps`), which costs time too. Per step played:
            kept, played = float(raw.get("eval/frames", 0)), self.progress.steps_played
            if fps > 0 and kept > 0 and played > kept:
                fps *= played / kept
            metrics = {
                "return": float(raw["eval/reward"]),
                "return_std": float(raw["eval/reward_std"]),
                "episodes": float(raw["eval/num_episodes"]),
                "episode_length": float(raw["eval/episode_length"]),
                "ms_per_step": 1000.0 / fps if fps > 0 else float("nan"),
                "wall_s": wall,
            }
            for key in ("success", "success_any"):
                if f"eval/{key}" in raw:
                    metrics[key] = float(raw[f"eval/{key}"])
            metrics.update({key[len("eval/"):]: float(value) for key, value in raw.items()
                            if key.startswith("eval/planner/")})  # the planner's diagnostics, if it writes them
            results[name] = metrics
            self._record(name, step, metrics)
            # Lists (not logged as scalars): every episode's return / success, for paired comparisons.
            for key in ("episode_returns", "episode_successes", "episode_successes_any"):
                if f"eval/{key}" in raw:
                    metrics[key] = list(raw[f"eval/{key}"])
            if on_result is not None:
                on_result(name, metrics)
        self.history.append((step, results[self.names[0]]))
        self.last_eval_step = step
        return results

    def _record(self, name: str, step: int, metrics: dict[str, float]) -> None:
        trainer = self._trainer
        prefix = "eval" if name == self.names[0] else f"eval/{name}"
        if trainer is not None and trainer.logger is not None:
            for key, value in metrics.items():
                trainer.logger.log_scalar(f"{prefix}/{key}", value, step=step)
        path = self.csv_for(name)
        if path is not None:
            new = not path.exists()
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", newline="") as file:
                writer = csv.writer(file)
                if new:
                    writer.writerow(["step", "return"])
                writer.writerow([step, f"{metrics['return']:.6g}"])
        if self.verbose:
            success = f", success {metrics['success']:.2f}" if "success" in metrics else ""
            print(
                f"[eval] {name} step {step}: return {metrics['return']:.1f} ± {metrics['return_std']:.1f} over "
                f"{int(metrics['episodes'])} episodes{success} ({metrics['ms_per_step']:.1f} ms/step)",
                flush=True,
            )

    def __call__(self) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        if getattr(trainer, "pretrain_pending", False):  # stopped inside the pre-training burst: a half-trained
            return  # model; the resumed run evaluates once it has finished the burst (next_eval is kept)
        frames = trainer.collected_frames
        # The last step is evaluated here, before the Trainer's final checkpoint, so that the checkpoint records
        # it (a resumed finished run does not evaluate it twice).
        if frames >= self.next_eval or (self.interval and frames >= trainer.total_frames
                                        and frames != self.last_eval_step):
            self.evaluate(frames)
            self.next_eval = (frames // self.interval + 1) * self.interval

    def initial(self) -> None:
        """Evaluates the untrained agent at step 0, as TD-MPC2 does (setup hook; skipped by a resumed run)."""
        trainer = self._trainer
        if trainer is not None and self.at_start and self.interval and trainer.collected_frames == 0 \
                and self.last_eval_step < 0:
            self.evaluate(0)

    def final(self) -> None:
        """Evaluates at the last frame count unless that was just done (shutdown hook). A run stopped early
        (:meth:`~torchrl.trainers.Trainer.request_stop`, e.g. preempted by SIGTERM) is not evaluated: its step is
        no evaluation step, and a preempted process has seconds left, not an evaluation's minutes."""
        trainer = self._trainer
        # TorchRL keeps the stop request in a private flag (no public getter in 0.14.1)
        if trainer is None or getattr(trainer, "_stop_training", False) or getattr(trainer, "pretrain_pending", False):
            return
        if self.interval and trainer.collected_frames != self.last_eval_step:
            self.evaluate(trainer.collected_frames)

    def truncate_after(self, step: int, keep_copy: bool = False) -> None:
        """Drops ``eval*.csv`` rows recorded after ``step`` (a killed run resuming from the checkpoint at ``step``;
        ``keep_copy``: see :func:`trim_csv_rows`)."""
        for name in self.names:
            path = self.csv_for(name)
            if path is not None:
                trim_csv_rows(path, step, header=True, keep_copy=keep_copy)

    def state_dict(self) -> dict[str, Any]:
        return {
            "next_eval": None if math.isinf(self.next_eval) else int(self.next_eval),
            "last_eval_step": self.last_eval_step,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.last_eval_step = int(state_dict["last_eval_step"])
        # The schedule follows this run's interval (the checkpoint's next_eval is that of the interval it was
        # written with): the next multiple after the last evaluation, as __call__ sets it; none with interval 0.
        self.next_eval = ((max(self.last_eval_step, 0) // self.interval + 1) * self.interval if self.interval
                          else math.inf)

    def register(self, trainer: Trainer, name: str = "evaluation") -> None:
        self._trainer = trainer
        trainer.register_op("setup", self.initial)
        trainer.register_op("post_steps", self)
        trainer.register_op("shutdown", self.final)
        trainer.register_module(name, self)

    def shutdown(self) -> None:
        for evaluator in self.evaluators.values():
            evaluator.shutdown()
        for env in self.envs.values():
            if not env.is_closed:
                env.close()


class WorldModelSnapshots(TrainerHookBase):
    """Keeps a world-model-only file every ``interval`` steps (and at step 0), which checkpoint rotation never
    deletes: ``<directory>/step_<N>.pt`` (:func:`~torchrl_dreammpc.checkpoints.save_world_model`, a few MB).

    Trainer checkpoints rotate and hold the replay buffer and optimizers; a snapshot is what is needed to
    evaluate the model of step ``N`` later (e.g. other planners on it: ``recipes/evaluate.py checkpoint=...``).
    A snapshot that exists is never overwritten (a resumed run that passes the same step again keeps the first).

    Args:
        directory (str or Path): where the snapshots go.
        interval (int): steps between two snapshots: one each time the step count reaches or passes a multiple
            of it, named after the step reached (with one frame per collector batch: the multiple itself).
    """

    def __init__(self, world_model: nn.Module, directory: str | Path, interval: int) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"snapshot interval must be a positive integer, got {interval!r}.")
        self.world_model = world_model
        self.directory = Path(directory)
        self.interval = interval
        self._trainer: Trainer | None = None
        self._last_step: int | None = None  # the step count at the previous call

    @staticmethod
    def path_for(directory: str | Path, step: int) -> Path:
        return Path(directory) / f"step_{int(step):08d}.pt"

    def save(self, step: int) -> Path | None:
        from torchrl_dreammpc.checkpoints import save_world_model

        path = self.path_for(self.directory, step)
        if path.exists():
            return None
        return save_world_model(self.world_model, path)

    def __call__(self) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        if getattr(trainer, "pretrain_pending", False):  # a half pre-trained model (see initial)
            return
        # A batch adds frames_per_batch x workers steps: the count may jump over the multiple (`%` would miss it).
        step = trainer.collected_frames
        last = self._last_step if self._last_step is not None else step - 1
        if step // self.interval > last // self.interval:
            self.save(step)
        self._last_step = step

    def initial(self) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        self._last_step = trainer.collected_frames  # (a resumed run: the step it resumed at)
        if getattr(trainer, "pretrain_pending", False):
            # resumed inside the pre-training burst: the batch that ended the seed phase took no snapshot (a half
            # pre-trained model). Counted from the newest snapshot on disk, one due then is taken once the burst
            # is finished (DreamMPCTrainer does it before collecting), named by the step reached then.
            taken = [int(path.stem.split("_")[1]) for path in Path(self.directory).glob("step_*.pt")]
            self._last_step = max(taken, default=-1)
        if trainer.collected_frames == 0:
            self.save(0)

    def register(self, trainer: Trainer, name: str = "snapshots") -> None:
        self._trainer = trainer
        trainer.register_op("setup", self.initial)
        trainer.register_op("post_steps", self)
