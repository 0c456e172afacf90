"""DreamerV3's update for :class:`~torchrl_dreammpc.modules.DreamerV3WorldModel`: TorchRL's DreamerV3 losses.

:class:`DreamerV3TrainingLoss` is TorchRL's :class:`~torchrl.objectives.DreamerV3Loss` (world model, imagination
actor, critic, replay critic), assembled from the model with [DreamerV3]'s settings (Hafner et al.,
arXiv:2301.04104; public code ``dreamerv3/configs.yaml``, values quoted by their name there). The one piece that is
ours is :class:`DreamerV3CriticEnsembleLoss`: DreamerV3 has one critic, the planners' uncertainty penalty needs
several, so each critic of the ensemble gets its own TorchRL :class:`~torchrl.objectives.DreamerV3ValueLoss` (and
its own slow critic), and the ensemble presents itself to :class:`DreamerV3Loss` as one value loss.

Discount. DreamerV3 folds ``γ = 1 - 1/horizon`` into the continue head's target (``contdisc``) and uses no γ in its
λ-returns. Here γ stays explicit: the continue head predicts the true continuation, and the actor loss's λ-return
estimator and the replay critic use ``γ = world_model.discount``. Both give the same returns (``γ·c`` per step),
and ``world_model.discount`` is then exactly the γ the planners weigh imagined rewards with.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tensordict import NestedKey, TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.objectives import (
    DreamerV3ActorLoss,
    DreamerV3Loss,
    DreamerV3ModelLoss,
    DreamerV3ValueLoss,
    LossModule,
    SoftUpdate,
)
from torchrl.objectives.utils import ValueEstimators

__all__ = ["DreamerV3CriticEnsembleLoss", "DreamerV3TrainingLoss", "SlowCriticUpdate", "end_episodes_before_starts"]


class DreamerV3CriticEnsembleLoss(LossModule):
    """An ensemble of DreamerV3 critics, each trained by its own :class:`~torchrl.objectives.DreamerV3ValueLoss`.

    Every member sees the same λ-return targets (computed by the actor loss from the ensemble's mean value) and has
    its own slow critic; the members differ by their initialization, as TD-MPC2's Q heads do. The losses are summed,
    so each critic receives exactly the gradient a single DreamerV3 critic would; the replay features (which carry
    the replay critic's gradient into the representation) pass the members' mean gradient, as one critic would. To
    :class:`~torchrl.objectives.DreamerV3Loss` it is one value loss: ``forward`` (imagined value loss),
    ``replay_value_loss`` (replay critic), ``tensor_keys`` and ``value_model`` (the mean critic).

    Args:
        critics (sequence of TensorDictModule): the value modules (``state_value_logits`` / ``state_value``).
        mean_critic (TensorDictModule): their mean (``state_value``), read by :class:`DreamerV3Loss` for its keys.

    Keyword Args:
        actor_loss (DreamerV3ActorLoss): where the members read γ from.
        slow_critic_regularization (float): [DreamerV3] ``slowreg`` (1.0).
        num_value_bins (int): two-hot bins (255).

    Examples:
        >>> from torchrl_dreammpc.modules import DreamerV3WorldModel
        >>> wm = DreamerV3WorldModel(5, 1, model_size="cpu", num_critics=3)
        >>> loss = DreamerV3CriticEnsembleLoss(wm.critic_modules(), wm.critic_mean_module())
        >>> len(loss.members)
        3
    """

    _AcceptedKeys = DreamerV3ValueLoss._AcceptedKeys  # the keys of a DreamerV3ValueLoss, passed on to the members
    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys

    def __init__(self, critics: Sequence[TensorDictModule], mean_critic: TensorDictModule, *,
                 actor_loss: DreamerV3ActorLoss | None = None, slow_critic_regularization: float = 1.0,
                 num_value_bins: int = 255):
        super().__init__()
        if len(critics) < 1:
            raise ValueError("DreamerV3CriticEnsembleLoss needs at least one critic.")
        self.members = nn.ModuleList(
            DreamerV3ValueLoss(critic, value_loss="two_hot", num_value_bins=num_value_bins, actor_loss=actor_loss,
                               slow_critic_regularization=slow_critic_regularization)
            for critic in critics)
        # Not a submodule: its weights are the members' (registered once, through them).
        self.__dict__["value_model"] = mean_critic

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    def set_keys(self, **kwargs) -> None:
        super().set_keys(**kwargs)
        for member in self.members:
            member.set_keys(**kwargs)

    def forward(self, fake_data) -> tuple[TensorDict, Any]:
        outs = [member(fake_data)[0] for member in self.members]
        return TensorDict(
            loss_value=torch.stack([out["loss_value"] for out in outs]).sum(),
            value_slow_loss=torch.stack([out["value_slow_loss"] for out in outs]).mean(),
        ), fake_data

    def replay_value_loss(self, tensordict, *, horizon: float = 333.0, lmbda: float = 0.95) -> TensorDict:
        # The replay features keep their gradient (DreamerV3's repval_grad): the representation learns from the
        # replay critic. K members would give it K times one critic's gradient (repval 0.3 acting as 0.3 K), so
        # each member sees the features with their gradient scaled by 1/K: the representation gets the members'
        # mean, each critic still its own full gradient.
        if len(self.members) > 1:
            tensordict = tensordict.copy()
            for key in self.members[0].value_model.in_keys:
                tensordict.set(key, _ScaleGradient.apply(tensordict.get(key), 1.0 / len(self.members)))
        losses = [member.replay_value_loss(tensordict, horizon=horizon, lmbda=lmbda)["loss_replay_value"]
                  for member in self.members]
        return TensorDict(loss_replay_value=torch.stack(losses).sum())


class _ScaleGradient(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class SlowCriticUpdate:
    """The slow critics' EMA ([DreamerV3] ``slowvalue: {rate: 0.02, every: 1}``): one TorchRL
    :class:`~torchrl.objectives.SoftUpdate` per critic of a :class:`DreamerV3CriticEnsembleLoss`, stepped as one
    target updater (what :class:`~torchrl.trainers.algorithms.DreamerV3OptimizationStepper` takes)."""

    def __init__(self, critic_loss: DreamerV3CriticEnsembleLoss, tau: float = 0.02):
        if not 0 < tau <= 1:
            raise ValueError(f"the slow-critic rate must be in (0, 1], got {tau}.")
        self.updaters = [SoftUpdate(member, tau=tau) for member in critic_loss.members]

    def step(self) -> None:
        for updater in self.updaters:
            updater.step()

    def state_dict(self) -> dict[str, Any]:
        return {"updaters": [updater.state_dict() for updater in self.updaters]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["updaters"]
        if len(states) != len(self.updaters):
            raise ValueError(f"the state holds {len(states)} slow critics, this update has {len(self.updaters)}.")
        for updater, state in zip(self.updaters, states):
            updater.load_state_dict(state)


class DreamerV3TrainingLoss(DreamerV3Loss):
    """TorchRL's :class:`~torchrl.objectives.DreamerV3Loss` over a
    :class:`~torchrl_dreammpc.modules.DreamerV3WorldModel`.

    Built from the model's tensordict views: :class:`~torchrl.objectives.DreamerV3ModelLoss` on
    ``world_model.sequence_model()`` (reconstruction of the symlog observation, two-hot reward, continue, and the
    separate dynamics/representation KLs with free nats and unimix, ``kl_mode="separate"``: the reference setting,
    not TorchRL's default), :class:`~torchrl.objectives.DreamerV3ActorLoss` imagining in
    ``world_model.imagination_env()`` with the continue head, TD(λ) returns with ``γ = world_model.discount``, and
    :class:`DreamerV3CriticEnsembleLoss`. The model is also registered here as ``world_model`` (checkpoints keep its
    weights under one prefix, ``world_model.``).

    Input: ``[B, T]`` replayed sequences with ``"observation"``, ``"action"``, ``("next", "observation")``,
    ``("next", "reward")``, ``("next", "done")``, ``("next", "terminated")``. Sum the ``loss_*`` entries.

    Args:
        world_model (DreamerV3WorldModel): the model (and actor-critic) to train.

    Keyword Args (defaults: [DreamerV3] configs.yaml):
        imagination_horizon (int): ``imag_length`` (15).
        lmbda (float): λ of the returns, ``imag_loss.lam`` / ``repl_loss.lam`` (0.95).
        entropy_bonus (float): ``imag_loss.actent`` (3e-4).
        use_reinforce (bool): REINFORCE actor gradients as the reference (``logpi * sg(adv)``); ``False`` uses the
            reparameterization gradient through the model (True).
        return_normalization_rate / _quantiles / _min_scale: ``retnorm`` (0.01, (0.05, 0.95), 1.0).
        free_nats (float): ``rssm.free_nats`` (1.0).
        dynamics_coef, representation_coef, reconstruction_coef, reward_coef, continue_coef, replay_value_coef:
            ``loss_scales`` dyn 1.0, rep 0.1, rec 1.0, rew 1.0, con 1.0, repval 0.3.
        slow_critic_regularization (float): ``imag_loss.slowreg`` (1.0).
        first_key (NestedKey, optional): a boolean entry ``[B, T, 1]``, true on the rows that begin an episode, for
            replayed sequences that cross episode ends (DreamerV3's windows): the RSSM restarts there
            (:meth:`~torchrl_dreammpc.modules.DreamerV3WorldModel.sequence_model`), and a row followed by an episode
            start counts as the end of its episode (``("next", "done")``) even where none was recorded (an episode
            cut short by a stopped process), so that no return runs from one episode into the next. ``None``
            (default): every sequence lies within one episode.
        context_key (NestedKey, optional): the posterior ``[state, belief]`` stored with each row (NaN where none
            was): a sequence whose first row does not begin an episode starts from it, DreamerV3's
            ``replay_context: 1`` (needs ``first_key``). The posteriors this pass computes are returned under
            ``"replay_context"`` (TorchRL's :class:`~torchrl.objectives.DreamerV3Loss`), for the replay to store.
            ``None`` (default): every sequence starts from the reset filter of its first observation.

    Examples:
        >>> from torchrl_dreammpc.modules import DreamerV3WorldModel
        >>> wm = DreamerV3WorldModel(5, 1, model_size="cpu")
        >>> loss = DreamerV3TrainingLoss(wm, imagination_horizon=3)
        >>> batch = TensorDict({"observation": torch.randn(2, 4, 5), "action": torch.rand(2, 4, 1) * 2 - 1,
        ...     "next": {"observation": torch.randn(2, 4, 5), "reward": torch.rand(2, 4, 1),
        ...              "done": torch.zeros(2, 4, 1, dtype=torch.bool),
        ...              "terminated": torch.zeros(2, 4, 1, dtype=torch.bool)}}, [2, 4])
        >>> out = loss(batch)
        >>> sorted(k for k in out.keys() if k.startswith("loss_"))[:3]
        ['loss_actor', 'loss_model_continue', 'loss_model_dynamic']
    """

    def __init__(
        self,
        world_model,
        *,
        imagination_horizon: int = 15,
        lmbda: float = 0.95,
        entropy_bonus: float = 3e-4,
        use_reinforce: bool = True,
        return_normalization_rate: float = 0.01,
        return_normalization_quantiles: tuple[float, float] = (0.05, 0.95),
        return_normalization_min_scale: float = 1.0,
        free_nats: float = 1.0,
        dynamics_coef: float = 1.0,
        representation_coef: float = 0.1,
        reconstruction_coef: float = 1.0,
        reward_coef: float = 1.0,
        continue_coef: float = 1.0,
        replay_value_coef: float = 0.3,
        slow_critic_regularization: float = 1.0,
        first_key: NestedKey | None = None,
        context_key: NestedKey | None = None,
    ):
        if isinstance(imagination_horizon, bool) or not isinstance(imagination_horizon, int) or imagination_horizon < 1:
            raise ValueError(f"imagination_horizon must be a positive integer, got {imagination_horizon!r}.")
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {lmbda}.")
        cfg = world_model.config
        model_loss = DreamerV3ModelLoss(
            world_model.sequence_model(first_key, context_key), kl_mode="separate", unimix=cfg.unimix,
            free_bits=free_nats, lambda_dynamic=dynamics_coef, lambda_representation=representation_coef, lambda_reco=reconstruction_coef,
            lambda_reward=reward_coef, lambda_continue=continue_coef, num_reward_bins=cfg.num_bins,
            # the replay critic trains the representation through the posterior features
            detach_output=False)
        model_loss.set_keys(pixels="observation", reco_pixels="reco_observation")
        mean_critic = world_model.critic_mean_module()
        actor_loss = DreamerV3ActorLoss(
            world_model.actor_module(), mean_critic, world_model.imagination_env(),
            continuation_model=world_model.continuation_module(), imagination_horizon=imagination_horizon,
            entropy_bonus=entropy_bonus, use_reinforce=use_reinforce,
            return_normalization_rate=return_normalization_rate,
            return_normalization_quantiles=tuple(return_normalization_quantiles),
            return_normalization_min_scale=return_normalization_min_scale)
        actor_loss.make_value_estimator(ValueEstimators.TDLambda, gamma=world_model.discount, lmbda=lmbda)
        critic_loss = DreamerV3CriticEnsembleLoss(
            world_model.critic_modules(), mean_critic, actor_loss=actor_loss,
            slow_critic_regularization=slow_critic_regularization, num_value_bins=cfg.num_bins)
        super().__init__(model_loss, actor_loss, critic_loss, replay_value_loss_weight=replay_value_coef,
                         continuation_horizon=1.0 / (1.0 - world_model.discount), lmbda=lmbda)
        self.world_model = world_model
        self.first_key, self.context_key = first_key, context_key
        self._register_load_state_dict_pre_hook(self._views_from_world_model)

    def _views_from_world_model(self, state_dict, prefix, *args) -> None:
        """Fills the weights of TorchRL's views of the model from the checkpoint's ``world_model.`` entries.

        The losses hold tensordict views of the model (``model_loss.world_model``, the actor's module, the
        imagination env), whose state-dict names follow the views' layout; they are the model's own weights again.
        A checkpoint written with another layout of the views (e.g. before the sequence model's rollout became
        :class:`~torchrl_dreammpc.modules.dreamer._ReplayRollout`) would otherwise fail to load, or load the views
        from stale names: their entries are dropped and refilled from the model's.
        """
        source = prefix + "world_model."
        if not any(key.startswith(source) for key in state_dict):
            return  # not a full checkpoint of this loss: let load_state_dict name what is missing
        model_names = {id(t): name for name, t in self.world_model.state_dict(keep_vars=True).items()}
        own = {key: model_names.get(id(t)) for key, t in self.state_dict(keep_vars=True).items()
               if not key.startswith("world_model.")}
        roots = {}  # a view's root (e.g. "model_loss.world_model") -> whether every entry under it is the model's
        for key, name in own.items():
            root = ".".join(key.split(".")[:2])
            roots[root] = roots.get(root, True) and name is not None
        views = tuple(root + "." for root, is_view in roots.items() if is_view)
        for key in [key for key in state_dict if key.startswith(prefix) and key[len(prefix):].startswith(views)]:
            del state_dict[key]
        for key, name in own.items():
            if key.startswith(views) and source + name in state_dict:
                state_dict[prefix + key] = state_dict[source + name]

    def forward(self, sample: TensorDictBase) -> TensorDictBase:
        if self.first_key is not None:
            sample = end_episodes_before_starts(sample, self.first_key)
        return super().forward(sample)


def end_episodes_before_starts(sample: TensorDictBase, first_key: NestedKey) -> TensorDictBase:
    """``sample`` ``[B, T]`` with ``("next", "done")`` set on every row that the next row's episode start ends.

    Examples:
        >>> sample = TensorDict({"is_init": torch.tensor([[True], [False], [True], [False]]).unsqueeze(0),
        ...                      "next": {"done": torch.zeros(1, 4, 1, dtype=torch.bool)}}, [1, 4])
        >>> end_episodes_before_starts(sample, "is_init")["next", "done"].flatten().tolist()
        [False, True, False, False]
    """
    first = sample.get(first_key).reshape(*sample.shape, 1).bool()
    done = sample.get(("next", "done"))
    ended = torch.cat([first[:, 1:], torch.zeros_like(first[:, :1])], 1).reshape(done.shape)
    nxt = sample.get("next").copy()  # shallow copies: the caller's sample is left as it is
    nxt.set("done", done | ended)
    sample = sample.copy()
    sample.set("next", nxt)
    return sample
