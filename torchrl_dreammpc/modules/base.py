"""The seam between planners and world models.

Planners (``torchrl_dreammpc.planners``) call a world model only through the methods of
:class:`WorldModelBase`. A new model family (a V-function model as in BMPC, a Dreamer-style RSSM) plans with
every planner once it implements them; the planners never look at the architecture.

Values: ``value(z, a)`` is a state-action value for every family. The planners' own value terms (the terminal
value of an imagined trajectory and the per-step ensemble disagreement that Dream-MPC penalizes) come from
:meth:`WorldModelBase.trajectory_values`, which a state-value model (BMPC) answers from its V ensemble
(``V(z_H)``, no policy call) and a state-action model (TD-MPC2) from ``Q(z_H, π(z_H))``.
"""
from __future__ import annotations

import abc

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase

__all__ = ["WorldModelBase", "state_action_trajectory_values"]


class WorldModelBase(TensorDictModuleBase, abc.ABC):
    """What a planner needs from a latent world model.

    Shapes: ``obs`` ``[*B, obs_dim]``, latents ``z`` ``[*B, latent_dim]``, actions ``a`` ``[*B, action_dim]``,
    scalars ``[*B, 1]``. Attributes every model provides: ``obs_dim``, ``action_dim``, ``latent_dim``,
    ``discount`` (the discount its values are defined with).

    Models whose latent depends on the history (a recurrent state-space model) cannot encode one observation
    alone. They set :attr:`latent_key`: the planners then read the latent from that tensordict entry (``encode``
    is not called), and :meth:`acting_module` puts the model's state estimator in front of the planner, with the
    env transforms it needs (:meth:`acting_transforms`) carrying its state from step to step.
    """

    obs_dim: int
    action_dim: int
    latent_dim: int
    discount: float
    #: Tensordict entry holding the latent the planners act from (written by :meth:`acting_module`'s state
    #: estimator); ``None``: the planners encode the observation themselves.
    latent_key = None
    #: The model family (``"tdmpc2"``, ``"bmpc"``, ``"dreamer_v3"``): the training algorithm of the same name trains
    #: it, and our checkpoint files record it (:data:`torchrl_dreammpc.checkpoints.FAMILIES`). ``None``: a model
    #: outside those (it still plans with every planner).
    family: str | None = None

    def check_inputs(self, obs: torch.Tensor | None = None, action: torch.Tensor | None = None,
                     check_finite: bool = True) -> None:
        """Raise a ValueError naming the problem for a wrong observation/action width (``obs_dim`` /
        ``action_dim``; a model without one of them skips that check) or non-finite values."""
        for name, x, dim in (("observation", obs, getattr(self, "obs_dim", None)),
                             ("action", action, getattr(self, "action_dim", None))):
            if x is None:
                continue
            if dim is not None and x.shape[-1] != dim:
                raise ValueError(f"{name} has width {x.shape[-1]} (shape {tuple(x.shape)}) but this "
                                 f"{type(self).__name__} was built for {name} width {dim}.")
            if check_finite and not bool(torch.isfinite(x).all()):
                bad = (~torch.isfinite(x)).sum().item()
                raise ValueError(f"{name} contains {bad} NaN/inf value(s); refusing to use it.")

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

    def state_value(self, z: torch.Tensor, eps: torch.Tensor | None = None, reduce: str = "avg") -> torch.Tensor:
        """Value of the latent ``z`` when acting with the policy prior from there, ``V^π(z)``: ``[*B, 1]``
        (``[K, *B, 1]`` for ``reduce="all"``).

        This default serves state-action value models: ``value(z, π(z), reduce)`` with the prior sampled with
        the standard-normal ``eps`` (its mean action for ``None``). State-value models return their ``V(z)``.
        """
        return self.value(z, _prior_action(self, z, eps), reduce=reduce)

    def trajectory_values(self, zs, actions: torch.Tensor, terminal_eps: torch.Tensor | None = None,
                          uncertainty: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The value terms the planners score an imagined trajectory with.

        Args:
            zs: the latents ``z_0 .. z_H``: a ``[H+1, M, L]`` tensor or a sequence of ``H+1`` ``[M, L]`` tensors
                (only ``z_H`` is read unless ``uncertainty``).
            actions (Tensor): ``a_0 .. a_{H-1}``, ``[H, M, A]``.
            terminal_eps (Tensor or None): standard-normal noise ``[M, A]`` of a policy sample at ``z_H`` (models
                that need one); ``None``: the prior's mean action.
            uncertainty (bool): also return the per-step disagreement.

        Returns:
            ``(v_H [M, 1], u [H+1, M, 1] or None)``: ``v_H`` the value of ``z_H`` under the policy prior (the
            average of two random ensemble members), ``u_t`` the ensemble disagreement ``mean_k · std_k`` at step
            ``t`` (Dream-MPC's penalty before its weight). This default (state-action values, TD-MPC2):
            ``v_H = Q̄(z_H, π(z_H))`` and ``u_t`` over ``Q_k(z_t, a_t)`` with ``a_H = π(z_H)``, all from one
            ensemble pass. A state-value model (BMPC) measures both on its V ensemble at ``z_t``.
        """
        return state_action_trajectory_values(self, zs, actions, terminal_eps, uncertainty)

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

    # ---- the whole model as one TensorDictModule ----
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """History-free pass: the latent (into :attr:`latent_key`, ``"latent"`` when that is ``None``) from
        ``"observation"`` (:meth:`encode`); with an ``"action"`` entry, also ``"next_latent"``, ``"reward"`` and
        ``"state_action_value"`` (the average of two members)."""
        z = self.encode(tensordict.get("observation"))
        tensordict.set(self.latent_key or "latent", z)
        if "action" in tensordict.keys():
            a = tensordict.get("action")
            tensordict.set("next_latent", self.next(z, a))
            tensordict.set("reward", self.reward(z, a))
            tensordict.set("state_action_value", self.value(z, a, reduce="avg"))
        return tensordict


def last_dim(spec_or_dim) -> int:
    """The size of the last dimension of a TorchRL spec (an ``int`` passes through): the observation / action
    size a model is built for."""
    if isinstance(spec_or_dim, int):
        return spec_or_dim
    shape = getattr(spec_or_dim, "shape", None)
    if shape is None or len(shape) == 0:
        raise TypeError(f"Expected an int or a TorchRL spec with a shape, got {spec_or_dim!r}")
    return int(shape[-1])


def _prior_action(model, z: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
    """The prior's action at ``z``: a sample with the given standard-normal ``eps``, or its mean for ``None``
    (through a model's fast ``policy_action`` when it has one)."""
    fast = getattr(model, "policy_action", None)
    if fast is not None:
        return fast(z, eps)
    return model.policy(z, deterministic=True)[0] if eps is None else model.policy(z, eps=eps)[0]


def _stacked(zs) -> torch.Tensor:
    return zs if isinstance(zs, torch.Tensor) else torch.stack(list(zs))


def state_action_trajectory_values(model, zs, actions: torch.Tensor, terminal_eps: torch.Tensor | None,
                                   uncertainty: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:meth:`WorldModelBase.trajectory_values` of a state-action value model (``model``: the model or its
    planning ops): ``Q̄(z_H, π(z_H))`` and, with ``uncertainty``, the disagreement of ``Q_k(z_t, a_t)`` for
    ``t = 0..H`` (``a_H = π(z_H)``), the terminal value and the disagreement from one ensemble pass."""
    z_H = zs[-1]
    a_H = _prior_action(model, z_H, terminal_eps)
    if not uncertainty:
        return model.value(z_H, a_H, reduce="avg"), None
    q, u = model.value_and_disagreement(_stacked(zs), torch.cat([actions, a_H.unsqueeze(0)]))  # [H+1, M, 1]
    return q[-1], u
