"""The seam between planners and world models.

Planners (``torchrl_dreammpc.planners``) call a world model only through the methods of
:class:`WorldModelBase`. A new model family (a V-function model as in BMPC, a Dreamer-style RSSM) plans with
every planner once it implements them; the planners never look at the architecture.
"""
from __future__ import annotations

import abc

import torch
from tensordict.nn import TensorDictModuleBase

__all__ = ["WorldModelBase"]


class WorldModelBase(TensorDictModuleBase, abc.ABC):
    """What a planner needs from a latent world model.

    Shapes: ``obs`` ``[*B, obs_dim]``, latents ``z`` ``[*B, latent_dim]``, actions ``a`` ``[*B, action_dim]``,
    scalars ``[*B, 1]``. Attributes every model provides: ``action_dim``, ``latent_dim``, ``discount`` (the
    discount its values are defined with).

    Models whose latent depends on the history (a recurrent state-space model) cannot encode one observation
    alone. They set :attr:`latent_key`: the planners then read the latent from that tensordict entry (``encode``
    is not called), and :meth:`acting_module` puts the model's state estimator in front of the planner, with the
    env transforms it needs (:meth:`acting_transforms`) carrying its state from step to step.
    """

    action_dim: int
    latent_dim: int
    discount: float
    #: Tensordict entry holding the latent the planners act from (written by :meth:`acting_module`'s state
    #: estimator); ``None``: the planners encode the observation themselves.
    latent_key = None

    @abc.abstractmethod
    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        """Observation → latent state."""

    @abc.abstractmethod
    def next(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Latent dynamics ``(z, a) → z'``."""

    @abc.abstractmethod
    def reward(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Predicted reward (decoded scalar) ``[*B, 1]``."""

    @abc.abstractmethod
    def value(self, z: torch.Tensor, a: torch.Tensor, reduce: str = "avg") -> torch.Tensor:
        """State-action value. ``reduce``: ``"all"`` (``[K, *B, 1]``, every ensemble member), ``"avg"`` / ``"min"``
        (``[*B, 1]``, over two randomly chosen members as in TD-MPC2)."""

    @abc.abstractmethod
    def policy(self, z: torch.Tensor, deterministic: bool = False, eps: torch.Tensor | None = None):
        """Policy prior: returns ``(action, mean, log_std)``; actions squashed to [-1, 1]. ``deterministic``
        returns the squashed mean; ``eps`` (standard normal noise) may be passed in to fix the sample."""

    @property
    def value_ensemble_size(self) -> int | None:
        """Members of the value ensemble that :meth:`value_disagreement` is measured over (``None``: unknown).
        Planners that penalize disagreement refuse a model with fewer than two."""
        return None

    def value_disagreement(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Uncertainty penalized by Dream-MPC: ``mean_k(Q_k) * std_k(Q_k)`` over the value ensemble."""
        q = self.value(z, a, reduce="all")
        return q.mean(0) * q.std(0)

    def value_and_disagreement(self, z: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(value(z, a, "avg"), value_disagreement(z, a))`` — models may share one ensemble pass for both."""
        return self.value(z, a, reduce="avg"), self.value_disagreement(z, a)

    def termination(self, z: torch.Tensor) -> torch.Tensor | None:
        """Probability that the episode ends in ``z`` (``[*B, 1]``), or ``None`` for non-episodic models."""
        return None

    def planning_ops(self):
        """What the planners call in their inner loops: an object with this class's tensor methods (``encode``,
        ``next``, ``reward``, ``policy``, ``value``, ``value_and_disagreement``, ``termination``) and attributes,
        returning the same values, whose parameters never receive gradients. The default is the model itself; a
        model may return a leaner functional view of itself (e.g. :class:`TDMPC2PlanningOps`). It is fetched once
        per control step, so it may be cached."""
        return self

    def acting_transforms(self) -> list:
        """Env transforms the acting path of this model needs (e.g. a :class:`~torchrl.envs.TensorDictPrimer`
        declaring a recurrent state). Default: none."""
        return []

    def acting_module(self, planner: TensorDictModuleBase) -> TensorDictModuleBase:
        """The module that acts in an env with ``planner`` over this model: the planner itself by default; a
        model with a :attr:`latent_key` puts its state estimator in front of it."""
        return planner
