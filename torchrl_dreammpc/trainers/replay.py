"""Replay of sub-trajectories for TD-MPC2: TorchRL's TensorDictReplayBuffer + SliceSampler, wired as a Trainer hook."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from torchrl.data import (
    LazyMemmapStorage,
    LazyTensorStorage,
    SliceSampler,
    StreamingSliceSampler,
    TensorDictReplayBuffer,
)
from torchrl.trainers import ReplayBufferTrainer, Trainer

from torchrl_dreammpc._checks import MissingKeyError

__all__ = ["REPLAY_KEYS", "STEP_KEY", "TRAJ_KEY", "STREAM_KEY", "EXPERT_KEY", "EXPERT_KEYS", "make_replay_buffer",
           "SliceReplayBufferTrainer", "OnlineStreamSampler", "mark_missing_experts", "mark_one_stream",
           "write_to_rows"]

#: The trajectory id every TorchRL collector writes; the sampler cuts slices where it changes.
TRAJ_KEY: tuple[str, str] = ("collector", "traj_ids")

#: The step index within an episode (written by :class:`~torchrl.envs.StepCounter`); stored for multi-worker runs.
STEP_KEY = "step_count"

#: A replay that samples windows across episode ends (DreamerV3's) cuts its slices where this id changes instead of
#: the trajectory id. With one env (:func:`mark_one_stream`) it is one stream: the env's episodes, those of a resumed
#: run included, follow each other in the storage.
STREAM_KEY: tuple[str, str] = ("collector", "stream")

#: What the buffer stores of each collected transition: what :class:`~torchrl_dreammpc.objectives.TDMPC2Loss`
#: reads, the end flags, and the trajectory id. The env's bookkeeping entries (``step_count``,
#: ``episode_reward``, ``is_init``) are dropped: they would double the row size for nothing.
REPLAY_KEYS: tuple[NestedKey, ...] = (
    "observation",
    "action",
    ("next", "observation"),
    ("next", "reward"),
    ("next", "terminated"),
    ("next", "truncated"),
    ("next", "done"),
    TRAJ_KEY,
)


#: Where BMPC's replay keeps the planner's ("expert") action distribution of each transition's state: its mean
#: ``("expert", "loc")`` and std ``("expert", "scale")``, shaped like the action (BMPC's ``expert_action_dist``).
#: NaN where no planner produced one (random seed steps, the policy prior acting); the lazy reanalyze overwrites it.
EXPERT_KEY = "expert"
EXPERT_KEYS: tuple[NestedKey, ...] = ((EXPERT_KEY, "loc"), (EXPERT_KEY, "scale"))


def mark_missing_experts(rows: TensorDictBase, like: NestedKey = "action") -> TensorDictBase:
    """Writes NaN as the expert distribution of the rows no planner produced one for, as BMPC stores them.

    That is rows without the entries (an actor that writes none, e.g. the policy prior) and rows whose scale is
    not a positive number: on the random-action steps of the seed phase TorchRL's collector carries the planner's
    output entries as the zeros it pre-allocated them with, and a planner's std is never 0 (MPPI's is at least
    ``min_std``, Dream-MPC's expert std at least 0.05).
    """
    loc, scale = rows.get(EXPERT_KEYS[0], None), rows.get(EXPERT_KEYS[1], None)
    if loc is None or scale is None:
        nan = torch.full_like(rows.get(like), float("nan"))
        rows.set(EXPERT_KEYS[0], nan)
        rows.set(EXPERT_KEYS[1], nan.clone())
        return rows
    invalid = ~(scale > 0).all(-1, keepdim=True)  # (NaN compares False)
    if bool(invalid.any()):
        rows.set(EXPERT_KEYS[0], loc.masked_fill(invalid, float("nan")))
        rows.set(EXPERT_KEYS[1], scale.masked_fill(invalid, float("nan")))
    return rows


def mark_one_stream(rows: TensorDictBase) -> TensorDictBase:
    """Writes :data:`STREAM_KEY` (0) into collected rows, for a replay whose slices cross episode ends: the rows of
    one collecting process (one env) follow each other in the storage, and the sampler cuts only at the write cursor
    once the buffer wraps. Episodes of a resumed run follow those of the stopped one; the loss ends an episode at
    the next one's first row (:func:`~torchrl_dreammpc.objectives.dreamer_v3.end_episodes_before_starts`).

    Examples:
        >>> rows = TensorDict({"observation": torch.zeros(3, 2)}, [3])
        >>> mark_one_stream(rows).get(STREAM_KEY).tolist()
        [0, 0, 0]
    """
    rows.set(STREAM_KEY, torch.zeros(rows.shape, dtype=torch.int64, device=rows.device))
    return rows


def write_to_rows(replay_buffer: TensorDictBase, index: torch.Tensor, entries: TensorDictBase) -> None:
    """Overwrites ``entries`` (``[N]``) of the stored rows at storage ``index`` (``[N]``), moved to the storage's
    device. Through TorchRL's ``ReplayBuffer.__setitem__``: no row is added or moved, the other entries of the rows
    stay as they are, and the sampler's boundaries and write versions are left alone (a patch, not a write).

    Examples:
        >>> rb = make_replay_buffer(8, horizon=2, batch_size=1)
        >>> _ = rb.extend(TensorDict({"x": torch.zeros(4), "y": torch.ones(4)}, [4]))
        >>> write_to_rows(rb, torch.tensor([1, 3]), TensorDict({"x": torch.tensor([5.0, 6.0])}, [2]))
        >>> rb.storage[:4]["x"].tolist(), rb.storage[:4]["y"].tolist()
        ([0.0, 5.0, 0.0, 6.0], [1.0, 1.0, 1.0, 1.0])
    """
    device = getattr(replay_buffer.storage, "device", None)
    if isinstance(device, (str, torch.device)) and device != "auto":
        entries = entries.to(device)
    replay_buffer[index.cpu()] = entries


class OnlineStreamSampler(StreamingSliceSampler):
    """DreamerV3's online replay queue (``replay.online: True``, ``embodied/core/replay.py``) over one stream of
    steps: every ``slice_len`` consecutive rows written make one window, queued once; a sample takes the queued
    windows first (oldest first), then uniform windows (:class:`~torchrl.data.SliceSampler` over the stream). So
    each collected step is replayed at least once soon after it is written, whatever the buffer's size.

    TorchRL's :class:`~torchrl.data.StreamingSliceSampler`, whose queue, write versions (a queued window whose rows
    were overwritten is dropped), sampling and checkpoint state are kept as they are. Only the partition of the
    writes into windows differs: TorchRL's cuts them at episode ends (``done``, ``"is_init"``) and drops the
    remainder of each episode, where DreamerV3 partitions its stream of steps across episode ends (the RSSM
    restarts at an episode's first row). For a replay across episode ends (``traj_key=STREAM_KEY``, one stream).

    Examples:
        >>> rb = TensorDictReplayBuffer(storage=LazyTensorStorage(16), batch_size=6, sampler=OnlineStreamSampler(
        ...     slice_len=3, traj_key=STREAM_KEY, init_key=None, truncated_key=None))
        >>> done = torch.tensor([False, False, False, True, False, False, False])
        >>> _ = rb.extend(mark_one_stream(TensorDict({"step": torch.arange(7), ("next", "done"): done}, [7])))
        >>> rb.sample()["step"].view(2, 3)  # the stream's first two windows, across the episode end at step 3
        tensor([[0, 1, 2],
                [3, 4, 5]])
    """

    def mark_update(self, index: int | torch.Tensor, *, storage=None) -> None:
        SliceSampler.mark_update(self, index, storage=storage)  # the uniform fallback's own bookkeeping
        if storage is None:
            return
        if isinstance(index, tuple) or storage.ndim != 1:
            raise RuntimeError("OnlineStreamSampler needs a one-dimensional storage.")
        written = torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu()[-storage.max_size:]
        if not written.numel():
            return
        self._ensure_slot_versions(int(written.max()) + 1, storage.max_size)
        versions = self._slot_versions[written] + 1  # one write holds each slot once (at most max_size rows)
        self._slot_versions[written] = versions
        rows = torch.cat([self._pending_indices, written])
        versions = torch.cat([self._pending_versions, versions])
        whole = rows.numel() // self.slice_len * self.slice_len
        self._queued_slices.extend(zip(rows[:whole].view(-1, self.slice_len).unbind(0),
                                       versions[:whole].view(-1, self.slice_len).unbind(0)))
        self._pending_indices, self._pending_versions = rows[whole:].clone(), versions[whole:].clone()
        while len(self._queued_slices) > storage.max_size // self.slice_len:  # older ones were overwritten
            self._queued_slices.popleft()


def make_replay_buffer(
    capacity: int,
    horizon: int,
    batch_size: int = 256,
    *,
    memmap: bool = False,
    scratch_dir: str | Path | None = None,
    traj_key: NestedKey = TRAJ_KEY,
    fragmented: bool = False,
    step_key: NestedKey = STEP_KEY,
    online: bool = False,
) -> TensorDictReplayBuffer:
    """TD-MPC2's replay buffer: ``batch_size`` sub-trajectories of ``horizon`` transitions per sample.

    A sample holds ``batch_size * horizon`` transitions, ``batch_size`` contiguous runs of ``horizon``, i.e.
    ``horizon + 1`` observations each (``observation`` of the first row, then the ``("next", "observation")``
    of every row) — what TD-MPC2 calls a sub-trajectory of length ``horizon + 1``. Reshape it to
    ``[batch_size, horizon]`` for :class:`~torchrl_dreammpc.objectives.TDMPC2Loss` (the
    :class:`SliceReplayBufferTrainer` hook does).

    Slices never cross an episode end: TorchRL's :class:`~torchrl.data.SliceSampler` cuts the storage wherever
    ``traj_key`` changes between two consecutive rows (and at the write cursor once the buffer wraps), and
    ``strict_length=True`` drops the pieces shorter than ``horizon``. A slice may end on a terminal step
    (``("next", "terminated")``), never contain one before its last row. With ``traj_key=STREAM_KEY`` (and
    :func:`mark_one_stream` on the rows) slices run across episode ends instead, as DreamerV3's replay windows.

    With several collector workers, consecutive rows come from different workers (a ``[workers, T]`` batch is
    written worker after worker), so contiguous runs of one trajectory id can be as short as ``T`` rows.
    ``fragmented=True`` makes the sampler rebuild each trajectory from ``(traj_key, step_key)`` pairs instead of
    storage adjacency (TorchRL's documented remedy for multi-process collectors), at a few ms per write.

    Args:
        capacity (int): maximum number of stored transitions (TD-MPC2: ``min(steps, 1_000_000)``).
        horizon (int): transitions per slice (TD-MPC2: 3).
        batch_size (int): slices per sample (TD-MPC2: 256).

    Keyword Args:
        memmap (bool): store on disk (:class:`~torchrl.data.LazyMemmapStorage`) rather than in RAM
            (:class:`~torchrl.data.LazyTensorStorage`). Defaults to ``False``.
        scratch_dir (str or Path, optional): where a memmap storage lives.
        traj_key (NestedKey): the trajectory-id entry. Defaults to ``("collector", "traj_ids")``.
        fragmented (bool): rebuild trajectories from ``(traj_key, step_key)`` rather than storage order (for
            multi-worker collection). Defaults to ``False``.
        step_key (NestedKey): step index within the episode (:class:`~torchrl.envs.StepCounter`'s
            ``"step_count"``); read only with ``fragmented=True``.
        online (bool): DreamerV3's online queue (:class:`OnlineStreamSampler`): each ``horizon`` rows written
            form a slice sampled once before the uniform ones. For one stream (``traj_key=STREAM_KEY``).
            Defaults to ``False``.

    Examples:
        >>> rb = make_replay_buffer(1000, horizon=3, batch_size=4)
        >>> rb.sampler.slice_len, rb.batch_size
        (3, 12)
    """
    if capacity < horizon:
        raise ValueError(f"capacity ({capacity}) must hold at least one slice of horizon {horizon}.")
    if horizon < 1 or batch_size < 1:
        raise ValueError(f"horizon and batch_size must be >= 1, got horizon={horizon}, batch_size={batch_size}.")
    if memmap:
        storage = LazyMemmapStorage(capacity, scratch_dir=None if scratch_dir is None else str(scratch_dir))
    else:
        storage = LazyTensorStorage(capacity)
    if online and (fragmented or traj_key != STREAM_KEY):
        raise ValueError("The online queue (online=True) partitions one stream of rows: it needs "
                         f"traj_key={STREAM_KEY!r} and fragmented=False.")
    sampler = (OnlineStreamSampler if online else SliceSampler)(
        slice_len=horizon,
        traj_key=traj_key,
        strict_length=True,
        # The boundaries are recomputed only after a write: the seed-phase pre-training (thousands of updates
        # with no write in between) samples from the cache.
        cache_values=not fragmented,
        # TDMPC2Loss reads neither an is_init nor a truncated marker: writing them would cost a copy per sample.
        truncated_key=None,
        init_key=None,
        **({} if online else dict(fragmented=fragmented, step_key=step_key)),
    )
    return TensorDictReplayBuffer(storage=storage, sampler=sampler, batch_size=batch_size * horizon)


class SliceReplayBufferTrainer(ReplayBufferTrainer):
    """:class:`~torchrl.trainers.ReplayBufferTrainer` for sub-trajectory replay.

    Differs from its parent in two places, both needed by TD-MPC2's loss:

    - :meth:`extend` flattens collector batches (``[T]``, or ``[workers, T]`` for multi-worker collectors)
      into rows without touching the end flags. The parent's ``flatten_tensordicts=True`` path marks the last
      row of every batch as ``truncated``, which with one-frame batches (UTD 1) would mark every transition.
      Only ``keys`` (:data:`REPLAY_KEYS` by default) are stored, and each of them is required after
      ``preprocess`` (a ``KeyError`` names the missing ones).
    - :meth:`sample` reshapes the flat ``[B * H]`` sample into ``[B, H]`` sub-trajectories (with the storage
      index of every row under ``"index"``, ``[B, H, 1]``, as TorchRL's sample gives it).

    ``preprocess`` (optional) edits the selected rows before they are written, e.g. :func:`mark_missing_experts`
    for BMPC (which writes the expert entries an actor did not).

    ``whole_episodes=True`` writes an episode when it ends (its ``("next", "done")`` row), as TD-MPC2's trainer
    adds episodes to its buffer: :class:`~torchrl.data.SliceSampler` draws a trajectory uniformly, so an episode
    written step by step while it is collected would get 1/(N+1) of the slices whatever its length. The rows of
    unfinished episodes wait in :attr:`pending` (checkpointed with this hook); after a resume (the env starts a new
    episode) the rows that waited are written as they are at the next write.

    It registers :meth:`extend` as a ``batch_process`` op, :meth:`sample` as a ``process_optim_batch`` op, and
    itself as the ``replay_buffer`` module (checkpointed with the Trainer); no ``post_loss`` priority update
    (uniform sampling, as in TD-MPC2).

    Args:
        replay_buffer (TensorDictReplayBuffer): a buffer from :func:`make_replay_buffer`.
        horizon (int): the slice length of its sampler.

    Keyword Args:
        device (torch.device, optional): where samples are moved. Defaults to ``None`` (stay on the storage's
            device).
        keys (sequence of NestedKey): entries stored. Defaults to :data:`REPLAY_KEYS`.
        preprocess (callable, optional): ``rows -> rows`` applied to the selected rows before they are written.
        whole_episodes (bool): write each episode when it ends (TD-MPC2) rather than each step as it comes.
            Default ``False``.
    """

    def __init__(
        self,
        replay_buffer: TensorDictReplayBuffer,
        horizon: int,
        *,
        device: torch.device | str | None = None,
        keys: Sequence[NestedKey] = REPLAY_KEYS,
        preprocess: Callable[[TensorDictBase], TensorDictBase] | None = None,
        whole_episodes: bool = False,
    ) -> None:
        super().__init__(replay_buffer, batch_size=None, device=device, flatten_tensordicts=False)
        self.horizon = horizon
        self.keys = tuple(keys)
        self.preprocess = preprocess
        self.whole_episodes = bool(whole_episodes)
        self.pending: dict[int, list[TensorDictBase]] = {}  # trajectory id -> rows of its unfinished episode
        self._stale: TensorDictBase | None = None  # rows that waited when the checkpoint was written

    def extend(self, batch: TensorDictBase) -> TensorDictBase:
        mask = batch.get(("collector", "mask"), None)
        rows = batch[mask] if mask is not None else batch.reshape(-1)
        if rows.numel():  # an empty write would leave the storage's cursor empty (and break its dump)
            collected = rows
            rows = rows.select(*self.keys, strict=False)
            if self.preprocess is not None:
                rows = self.preprocess(rows)
            present = set(rows.keys(True))
            missing = [key for key in self.keys if key not in present]
            if missing:
                present = set(collected.keys(True))
                # Storing the rows without them would make every sample fail later, or worse, be read with a default.
                raise MissingKeyError(
                    f"The collected batch lacks {missing}, which the replay buffer stores for the loss and the slice "
                    f"sampler (it has {sorted(map(str, present))}). Collect with an env that writes them "
                    "(torchrl_dreammpc.envs.make_env does).")
            if self.whole_episodes:
                self._extend_whole_episodes(rows)
            else:
                self.replay_buffer.extend(rows)
        return batch

    def _extend_whole_episodes(self, rows: TensorDictBase) -> None:
        storage = self.replay_buffer.storage
        if not getattr(storage, "initialized", True):
            # A checkpoint may come before the first episode ends, and TorchRL cannot save a storage that no row
            # has shaped yet: shape it from this row now, as its first write would (nothing is stored).
            storage._init(rows[0])
        if self._stale is not None:  # their episode ended with the process that collected it
            self.replay_buffer.extend(self._stale)
            self._stale = None
        ids = rows.get(TRAJ_KEY).reshape(-1)
        done = rows.get(("next", "done")).reshape(rows.shape[0], -1).any(-1)
        for traj in ids.unique(sorted=False).tolist():
            mine = ids == traj
            self.pending.setdefault(traj, []).append(rows[mine])
            if bool(done[mine].any()):
                self.replay_buffer.extend(torch.cat(self.pending.pop(traj)))

    def sample(self, batch: TensorDictBase | None = None) -> TensorDictBase:
        if self.whole_episodes and len(self.replay_buffer) == 0:
            raise RuntimeError("The replay buffer holds no complete episode yet (whole_episodes=True: an episode is "
                               "written when it ends): the seed phase must cover at least one whole episode.")
        sample = self.replay_buffer.sample()
        sample = sample.reshape(-1, self.horizon)
        return sample.to(self.device) if self.device is not None else sample

    def pending_state(self) -> "_PendingRows":
        """The checkpoint component of the rows waiting for their episode's end (:attr:`pending`)."""
        return _PendingRows(self)

    def register(self, trainer: Trainer, name: str = "replay_buffer") -> None:
        trainer.register_op("batch_process", self.extend)
        trainer.register_op("process_optim_batch", self.sample)
        trainer.register_module(name, self)
        if self.whole_episodes:
            trainer.register_module(f"{name}_pending", self.pending_state())


class _PendingRows:
    """The unfinished episodes' rows of a :class:`SliceReplayBufferTrainer` as a checkpoint component (the buffer
    itself is saved by TorchRL's dump/load, which knows nothing of them)."""

    def __init__(self, hook: SliceReplayBufferTrainer) -> None:
        self.hook = hook

    def state_dict(self) -> dict:
        parts = [row for rows in self.hook.pending.values() for row in rows]
        if self.hook._stale is not None:
            parts.insert(0, self.hook._stale)
        return {"rows": torch.cat(parts) if parts else None}

    def load_state_dict(self, state_dict: dict) -> None:
        rows = state_dict.get("rows")
        if rows is not None and not isinstance(rows, TensorDictBase):  # (a checkpoint gives plain nested dicts)
            rows = TensorDict(rows, batch_size=[len(rows["collector"]["traj_ids"])]) if rows else None
        self.hook.pending = {}
        self.hook._stale = rows

