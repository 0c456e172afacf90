"""BMPC's lazy reanalyze as a TorchRL Trainer hook that writes into the replay storage."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.trainers import Trainer, TrainerHookBase

from torchrl_dreammpc.planners.base import LatentPlannerBase
from torchrl_dreammpc.trainers.replay import write_to_rows

__all__ = ["LazyReanalyze", "CPU_STATES_PER_CALL"]

#: States per reanalyze planner call on a CPU (see ``LazyReanalyze(states_per_call=...)``): measured with BMPC's
#: MPPI (512 samples, 6 iterations) on the 1M model, 1 thread, 60 states in chunks of 1 / 3 / 6 / 12 / 20 / 60:
#: 36 / 35-39 / 33-37 / 43 / 38 / 58-65 s (a loaded 2-core machine: compare within the row).
CPU_STATES_PER_CALL = 6


class LazyReanalyze(TrainerHookBase):
    """Re-plans some sampled states with the current model and writes the new expert distributions back.

    BMPC (Wang et al., ICLR 2025, ``BMPC.update`` / ``reanalyze``; ``config.yaml``: ``reanalyze_interval: 10``,
    ``reanalyze_batch_size: 20``, ``reanalyze_horizon: 3``): the expert distribution stored with a transition
    ages as the model improves, so every ``interval``-th update (not counting the seed-phase pre-training) the
    first ``num_slices`` of the ``[B, H]`` sampled sub-trajectories (``num_slices * H`` states, BMPC: 60) are
    planned again from scratch and

    - their ``(expert_key, "loc")`` / ``(expert_key, "scale")`` are overwritten in the replay **storage** (at the
      rows' storage indices, the ``"index"`` entry of the sample, through TorchRL's ``ReplayBuffer.__setitem__``,
      which leaves the sampler's cached trajectory boundaries alone: no row is added or moved);
    - the same values replace them in the batch the update is about to use.

    The ``planner`` must write the expert (``expert_key``); BMPC's is its MPPI without a warm start (reset before
    every call), in exploration mode, with the prior's trajectories sampled with the wider exploration std
    (``context``: :meth:`BMPCWorldModel.exploration_prior <torchrl_dreammpc.modules.BMPCWorldModel.exploration_prior>`).
    The model is evaluated in ``eval()`` mode (no dropout), as BMPC does, and left in the mode it was in.

    Registered as a ``process_optim_batch`` op after the replay hook (so it sees the ``[B, H]`` sample), and as
    a module (its update counter is checkpointed). It reads ``trainer.pretraining``
    (:class:`~torchrl_dreammpc.trainers.DreamMPCTrainer`): no reanalyze and no count during pre-training.

    Args:
        planner (LatentPlannerBase): the re-planning actor (writes ``expert_key``).

    Keyword Args:
        interval (int): updates between two reanalyzes (BMPC: 10). ``0`` disables the hook.
        num_slices (int): sub-trajectories re-planned each time (BMPC: 20; at most the batch's).
        expert_key (NestedKey): the expert entry in the batch and storage. Default ``"expert"``.
        observation_key (NestedKey): the observation entry. Default ``"observation"``.
        index_key (NestedKey): the storage indices of the sample. Default ``"index"``.
        context (callable, optional): a context-manager factory entered around each re-plan (e.g. the model's
            exploration prior).
        states_per_call (int or "auto"): states per planner call (each state is planned independently; only the
            cost changes). ``"auto"`` (default): :data:`CPU_STATES_PER_CALL` on a CPU, where a 60-state MPPI call
            (30720 rows) runs ~1.7x slower per state than 6-state calls (its activations outgrow the caches;
            docs/performance.md), all at once on other devices.

    Examples:
        >>> from torchrl_dreammpc.modules import BMPCWorldModel
        >>> from torchrl_dreammpc.planners import MPPIPlanner
        >>> wm = BMPCWorldModel(5, 1, model_size=1, enc_dim=32, mlp_dim=32, latent_dim=16).eval()
        >>> hook = LazyReanalyze(MPPIPlanner(wm, num_samples=32, num_elites=4, expert_key="expert"),
        ...                      interval=1, num_slices=2, context=wm.exploration_prior)
        >>> batch = TensorDict({"observation": torch.randn(4, 3, 5), "index": torch.arange(12).view(4, 3, 1),
        ...     "expert": {"loc": torch.full((4, 3, 1), float("nan")), "scale": torch.ones(4, 3, 1)}}, [4, 3])
        >>> hook.reanalyze(batch)["expert", "loc"][:2].isnan().any().item()  # no replay buffer: the batch only
        False
    """

    def __init__(
        self,
        planner: LatentPlannerBase,
        *,
        interval: int = 10,
        num_slices: int = 20,
        expert_key: NestedKey = "expert",
        observation_key: NestedKey = "observation",
        index_key: NestedKey = "index",
        context: Callable[[], contextlib.AbstractContextManager] | None = None,
        states_per_call: int | str = "auto",
    ) -> None:
        for name, value, low in (("interval", interval, 0), ("num_slices", num_slices, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"reanalyze {name} must be an integer >= {low}, got {value!r}.")
        if getattr(planner, "expert_key", None) != expert_key:
            raise ValueError(f"The reanalyze planner must write the expert distribution under {expert_key!r} "
                             f"(build it with expert_key={expert_key!r}); it writes {planner.expert_key!r}.")
        self.planner = planner
        self.interval, self.num_slices = interval, num_slices
        self.expert_key, self.observation_key, self.index_key = expert_key, observation_key, index_key
        self.context = context
        if states_per_call != "auto" and (isinstance(states_per_call, bool) or not isinstance(states_per_call, int)
                                          or states_per_call < 1):
            raise ValueError(f"states_per_call must be a positive integer or 'auto', got {states_per_call!r}.")
        self.states_per_call = states_per_call
        self.updates = 0  # updates counted (BMPC's update_count)
        self.reanalyzed = 0  # states re-planned so far
        self.replay_buffer = None
        self._trainer: Trainer | None = None

    def _entry(self, name: str) -> tuple:
        key = self.expert_key
        return (*key, name) if isinstance(key, tuple) else (key, name)

    def __call__(self, batch: TensorDictBase) -> TensorDictBase:
        if not self.interval or getattr(self._trainer, "pretraining", False):
            return batch
        self.updates += 1
        if self.updates % self.interval:
            return batch
        return self.reanalyze(batch)

    @torch.no_grad()
    def reanalyze(self, batch: TensorDictBase) -> TensorDictBase:
        """Re-plans the first ``num_slices`` sub-trajectories of the ``[B, H]`` ``batch`` now; writes the new expert
        into the batch (returned) and, when registered on a trainer, into its replay storage."""
        if batch.batch_dims != 2:
            raise ValueError(f"LazyReanalyze expects a [B, H] batch of sub-trajectories, got batch size "
                             f"{tuple(batch.batch_size)}.")
        n, H = min(self.num_slices, batch.shape[0]), batch.shape[1]
        obs = batch.get(self.observation_key)[:n].reshape(n * H, -1)
        world_model = self.planner.world_model
        modes = [(m, m.training) for m in world_model.modules()]
        world_model.eval()
        chunk = self.states_per_call
        if chunk == "auto":
            chunk = CPU_STATES_PER_CALL if obs.device.type == "cpu" else n * H
        parts = []
        try:
            with self.context() if self.context is not None else contextlib.nullcontext(), \
                    set_exploration_type(ExplorationType.RANDOM):
                for start in range(0, n * H, chunk):
                    self.planner.reset()  # BMPC plans with t0=True: no warm start
                    rows = obs[start:start + chunk]
                    parts.append(self.planner(TensorDict({self.planner.observation_key: rows}, [rows.shape[0]],
                                                         device=obs.device)))
        finally:
            for module, training in modes:
                module.training = training
            self.planner.reset()
        expert = TensorDict({name: torch.cat([part.get(self._entry(name)) for part in parts])
                             for name in ("loc", "scale")}, [n * H])
        if self.replay_buffer is not None:
            index = batch.get(self.index_key)[:n].reshape(n * H, -1)[:, 0]  # 1-D storage: one index per row
            write_to_rows(self.replay_buffer, index, TensorDict({self.expert_key: expert}, [n * H]))
        for name in ("loc", "scale"):
            value = batch.get(self._entry(name)).clone()
            value[:n] = expert.get(name).reshape(n, H, -1).to(value.device)
            batch.set(self._entry(name), value)
        self.reanalyzed += n * H
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "reanalyzed": self.reanalyzed}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.updates = int(state_dict["updates"])
        self.reanalyzed = int(state_dict["reanalyzed"])

    def register(self, trainer: Trainer, name: str = "reanalyze") -> None:
        self._trainer = trainer
        self.replay_buffer = trainer.replay_buffer
        trainer.register_op("process_optim_batch", self)
        trainer.register_module(name, self)
