"""DreamerV3's world model (state observations) from TorchRL's modules, behind :class:`WorldModelBase`.

Architecture and hyperparameters: Hafner, Pasukonis, Ba & Lillicrap, "Mastering Diverse Domains through World
Models" (DreamerV3), arXiv:2301.04104, and its public code (``dreamerv3/configs.yaml``, quoted as [DreamerV3]
below). The parts are TorchRL 0.14.1's: :class:`~torchrl.modules.RSSMPriorV3` with the block-diagonal GRU core,
:class:`~torchrl.modules.RSSMPosteriorV3`, :class:`~torchrl.modules.DreamerV3MLP` heads (RMSNorm + SiLU),
:class:`~torchrl.modules.SymExpTwoHot` reward and value decoding over 255 symexp bins,
:class:`~torchrl.modules.RSSMStateEstimatorV3` for acting. What is ours: the wiring, a critic *ensemble*
(DreamerV3 has one critic; the planners' uncertainty penalty needs at least two), and the planning view of
the RSSM (:meth:`DreamerV3WorldModel.next` and friends).

The latent ``z`` is the concatenation ``[state, belief]``: the stochastic state (``stoch`` one-hot categoricals
of ``classes`` classes, flattened) and the deterministic belief (the GRU state, ``deter`` wide).
"""
from __future__ import annotations

import dataclasses

import torch
from tensordict import NestedKey, TensorDictBase
from tensordict.nn import (
    InteractionType,
    ProbabilisticTensorDictModule,
    ProbabilisticTensorDictSequential,
    TensorDictModule,
    TensorDictModuleBase,
    TensorDictSequential,
)
from torch import nn
from torch.nn import functional as F
from torchrl.data import Bounded, Composite, Unbounded
from torchrl.envs import TensorDictPrimer
from torchrl.envs.model_based.dreamer import DreamerEnv
from torchrl.modules import (
    DreamerV3MLP,
    RSSMPosteriorV3,
    RSSMPriorV3,
    RSSMStateEstimatorV3,
    SymExpTwoHot,
    TanhNormal,
    WorldModelWrapper,
)
from torchrl.modules.functional import symexp, symlog
# Private in TorchRL 0.14.1: DreamerV3MLP's RMS norm (_float64_logits evaluates it itself) and the categorical draw
# of the RSSM (_ReplayRollout draws as RSSMRolloutV3 does, through the module: one function for both).
from torchrl.modules.models import model_based as _torchrl_rssm
from torchrl.modules.models.model_based import _DreamerV3RMSNorm

from torchrl_dreammpc.modules.base import WorldModelBase, last_dim
from torchrl_dreammpc.modules.layers import param_count

__all__ = ["DreamerV3WorldModel", "DreamerV3Config", "DREAMER_V3_SIZES", "ActingPath"]

#: Model sizes. ``"1m"`` ... ``"400m"`` are [DreamerV3]'s ``size*`` presets (configs.yaml: rssm ``deter``, ``hidden``,
#: ``classes``; MLP ``units``); their names count the parameters of the image model, a state-observation model
#: is smaller (see ``num_params``). [DreamerV3] trains proprioceptive DMC with ``size1m`` (``dmc_proprio``).
#: ``"cpu"`` is ours: half the belief and half the categoricals of ``size1m``, for runs on two CPU cores.
DREAMER_V3_SIZES: dict[str, dict[str, int]] = {
    "cpu": dict(deter=256, hidden=64, stoch=16, classes=4, units=64),
    "1m": dict(deter=512, hidden=64, stoch=32, classes=4, units=64),
    "12m": dict(deter=2048, hidden=256, stoch=32, classes=16, units=256),
    "25m": dict(deter=3072, hidden=384, stoch=32, classes=24, units=384),
    "50m": dict(deter=4096, hidden=512, stoch=32, classes=32, units=512),
    "100m": dict(deter=6144, hidden=768, stoch=32, classes=48, units=768),
    "200m": dict(deter=8192, hidden=1024, stoch=32, classes=64, units=1024),
    "400m": dict(deter=12288, hidden=1536, stoch=32, classes=96, units=1536),
}


@dataclasses.dataclass
class DreamerV3Config:
    """Every size and constant of a :class:`DreamerV3WorldModel` (saved in checkpoints to refuse mismatches).

    Defaults are [DreamerV3]'s (configs.yaml, ``agent``): RSSM ``blocks: 8, dynlayers: 1, imglayers: 2,
    obslayers: 1, unimix: 0.01``; encoder and decoder MLPs of 3 layers; reward and continue heads of 1 layer;
    policy and value of 3 layers; 255 bins; policy std in ``[minstd, maxstd] = [0.1, 1.0]``, output scale 0.01;
    RMSNorm epsilon 1e-4; ``discount = 1 - 1 / horizon`` with ``horizon: 333``.
    """

    obs_dim: int
    action_dim: int
    model_size: str = "1m"
    deter: int = 512
    hidden: int = 64
    stoch: int = 32
    classes: int = 4
    units: int = 64
    blocks: int = 8
    dyn_layers: int = 1
    img_layers: int = 2
    obs_layers: int = 1
    enc_layers: int = 3
    dec_layers: int = 3
    reward_layers: int = 1
    cont_layers: int = 1
    actor_layers: int = 3
    critic_layers: int = 3
    num_critics: int = 2
    num_bins: int = 255
    unimix: float = 0.01
    actor_min_std: float = 0.1
    actor_max_std: float = 1.0
    actor_outscale: float = 0.01
    norm_eps: float = 1e-4
    discount: float = 1.0 - 1.0 / 333.0

    @classmethod
    def from_size(cls, obs_dim: int, action_dim: int, model_size: str = "1m", **overrides) -> "DreamerV3Config":
        model_size = str(model_size)
        if model_size not in DREAMER_V3_SIZES:
            raise ValueError(f"Unknown DreamerV3 model_size {model_size!r}; choose one of {list(DREAMER_V3_SIZES)}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"Unknown DreamerV3Config field(s) {sorted(unknown)}; known: {sorted(names)}")
        config = cls(obs_dim=obs_dim, action_dim=action_dim, model_size=model_size,
                     **{**DREAMER_V3_SIZES[model_size], **overrides})
        config.check()
        return config

    def check(self) -> None:
        """Raises a ValueError naming the field for sizes the modules cannot be built with."""
        for name in ("obs_dim", "action_dim", "deter", "hidden", "stoch", "classes", "units", "blocks", "dyn_layers",
                     "img_layers", "obs_layers", "enc_layers", "dec_layers", "reward_layers", "cont_layers",
                     "actor_layers", "critic_layers", "num_critics"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DreamerV3Config.{name} must be a positive integer, got {value!r}.")
        if self.deter % self.blocks:
            raise ValueError(f"DreamerV3Config.deter ({self.deter}) must be divisible by blocks ({self.blocks}).")
        if self.num_bins < 2:
            raise ValueError(f"DreamerV3Config.num_bins must be >= 2, got {self.num_bins}.")
        if not 0.0 < self.discount < 1.0:
            raise ValueError(f"DreamerV3Config.discount must be in (0, 1), got {self.discount}.")
        if not 0.0 <= self.unimix < 1.0:
            raise ValueError(f"DreamerV3Config.unimix must be in [0, 1), got {self.unimix}.")
        if not 0.0 < self.actor_min_std < self.actor_max_std:
            raise ValueError("DreamerV3Config needs 0 < actor_min_std < actor_max_std, got "
                             f"{self.actor_min_std}, {self.actor_max_std}.")


# ---------------------------------------------------------------------------------------------------------------
# small modules (each TensorDictModule wraps one of these; the weights live in DreamerV3WorldModel)
# ---------------------------------------------------------------------------------------------------------------
class _SymlogEncoder(nn.Module):
    """[DreamerV3] vector encoder: symlog of the observation, then an MLP; its last hidden layer is the embedding."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(symlog(obs))


class _SymexpDecoder(nn.Module):
    """The decoder predicts the symlog of the observation; it is returned symexp'ed, so that
    :class:`~torchrl.objectives.DreamerV3ModelLoss` (``reco_symlog=True``) compares ``symlog(target)`` with it."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, state: torch.Tensor, belief: torch.Tensor) -> torch.Tensor:
        return symexp(self.net(state, belief))


class _ActorHead(nn.Module):
    """[DreamerV3] continuous policy parameters: ``(loc, scale)`` with ``scale = (max - min) sigmoid(x + 2) + min``.
    The action is ``tanh(loc + scale * eps)`` (TorchRL's :class:`~torchrl.modules.TanhNormal`)."""

    def __init__(self, net: nn.Module, min_std: float, max_std: float):
        super().__init__()
        self.net = net
        self.min_std, self.max_std = min_std, max_std

    def forward(self, *latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw_std = self.net(*latent).chunk(2, dim=-1)
        return loc, (self.max_std - self.min_std) * torch.sigmoid(raw_std + 2.0) + self.min_std


class _CriticMean(nn.Module):
    """Decoded value averaged over the critic ensemble: what the actor loss bootstraps from."""

    def __init__(self, critics: nn.ModuleList, two_hot: SymExpTwoHot):
        super().__init__()
        self.critics, self.two_hot = critics, two_hot

    def forward(self, state: torch.Tensor, belief: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.two_hot(critic(state, belief)) for critic in self.critics]).mean(0)


class _ContinueProbability(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, state: torch.Tensor, belief: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(state, belief))


class _ReplayRollout(nn.Module):
    """The RSSM over replayed rows ``[B, T]``: row ``t`` steps the carry with its action and filters its next
    observation (``prior_logits``, ``posterior_logits``, ``state``, ``belief`` of the next observation).

    A row that begins an episode (``first``), and the first row of every sequence, starts from its own observation
    filtered from a reset state, exactly as the acting path filters an episode's first observation
    (:class:`~torchrl.modules.RSSMStateEstimatorV3` after a reset: zero state, belief and previous action; one GRU
    step; the posterior of the observation). So training and acting agree at episode starts, and a sequence that
    crosses an episode end (DreamerV3's replay windows) restarts there.

    With a replay context (``context``, DreamerV3's ``replay_context: 1``), a sequence whose first row does not
    begin an episode starts instead from the posterior ``[state, belief]`` stored with that row (by the acting
    path when it was collected, or by the last training pass over it; see
    :class:`~torchrl_dreammpc.trainers.dreamer_v3.ReplayContext`); rows stored without one (NaN: the seed
    phase's random actions) start from the reset filter as above. The stored posterior is a constant: no gradient
    flows into it, as into DreamerV3's replayed carry.

    Not :class:`~torchrl.modules.RSSMRolloutV3`: its reset zeroes the carry and the row's action and filters the
    row's *next* observation, so the first observation of an episode is never seen and its first action is lost;
    without resets the two agree bit for bit (the same calls and draws, tests/test_dreamer.py).
    """

    def __init__(self, encoder: nn.Module, prior: RSSMPriorV3, posterior: RSSMPosteriorV3, action_dim: int):
        super().__init__()
        self.encoder, self.prior, self.posterior = encoder, prior, posterior
        self.action_dim = action_dim
        self.state_dim = prior.num_categoricals * prior.num_classes

    def filter_reset(self, observation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(state, belief)`` of ``observation`` [*B, obs] seen first after a reset."""
        batch = observation.shape[:-1]
        state = observation.new_zeros(*batch, self.prior.num_categoricals * self.prior.num_classes)
        belief = observation.new_zeros(*batch, self.prior.rnn_hidden_dim)
        belief = self.prior._update_belief(state, belief, observation.new_zeros(*batch, self.action_dim))
        _, state = self.posterior(belief, self.encoder(observation))
        return state, belief

    def forward(self, observation: torch.Tensor, action: torch.Tensor, embedding: torch.Tensor,
                first: torch.Tensor | None = None, context: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if first is not None:
            first = first.reshape(*action.shape[:-1], 1).bool()  # [*B, T, 1]
        state, belief = self.filter_reset(observation[..., 0, :])  # drawn with a context too: the same draws
        if context is not None:
            stored = context[..., 0, :].detach()
            use = torch.isfinite(stored).all(-1, keepdim=True)
            if first is not None:
                use = use & ~first[..., 0, :]
            stored = torch.nan_to_num(stored)  # (rows without one take the reset filter's)
            state = torch.where(use, stored[..., :self.state_dim], state)
            belief = torch.where(use, stored[..., self.state_dim:], belief)
        T = action.shape[-2]
        # One draw for the whole sequence, shaped as RSSMRolloutV3 draws it (index 1 feeds the posterior).
        uniforms = torch.rand(T, 2, *action.shape[:-2], self.posterior.num_categoricals, device=action.device)
        restart_at = set()
        if first is not None and T > 1:
            restart_at = set((first[..., 1:, 0].reshape(-1, T - 1).any(0).nonzero().flatten() + 1).tolist())
        prior_logits, posterior_logits, states, beliefs = [], [], [], []
        for t in range(T):
            if t in restart_at:
                fresh_state, fresh_belief = self.filter_reset(observation[..., t, :])
                state = torch.where(first[..., t, :], fresh_state, state)
                belief = torch.where(first[..., t, :], fresh_belief, belief)
            prior_t, belief = self.prior._belief_and_logits(state, belief, action[..., t, :])
            posterior_t = self.posterior._logits(belief, embedding[..., t, :])
            state = _torchrl_rssm._straight_through_categorical(posterior_t, self.posterior.unimix, uniforms[t, 1])
            state = state.flatten(-2)
            prior_logits.append(prior_t)
            posterior_logits.append(posterior_t)
            states.append(state)
            beliefs.append(belief)
        prior_logits, posterior_logits = torch.stack(prior_logits, -3), torch.stack(posterior_logits, -3)
        states, beliefs = torch.stack(states, -2), torch.stack(beliefs, -2)
        return prior_logits, posterior_logits, states, beliefs


class _Concat(nn.Module):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=-1)


class _Clone(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class ActingPath(TensorDictModuleBase):
    """The acting sequence of :meth:`DreamerV3WorldModel.acting_module`, run on the model's device.

    Its inputs are moved to the device of the model's weights and its outputs back to the device of the
    ``"observation"`` (an env on the CPU, a model on CUDA: TD-MPC2's planners move the observation themselves,
    the estimator's modules would not); on one device it is a plain call. ``sequence`` is the
    :class:`~tensordict.nn.TensorDictSequential`, ``planner`` the planner in it.
    """

    def __init__(self, sequence: TensorDictSequential, planner: TensorDictModuleBase, model: nn.Module):
        super().__init__()
        self.sequence, self.planner = sequence, planner
        self.__dict__["_model"] = model  # not a submodule: the sequence holds its parts already
        self.in_keys, self.out_keys = list(sequence.in_keys), list(sequence.out_keys)

    @property
    def diagnostics(self) -> bool:
        """Whether the planner writes ``("planner", ...)`` diagnostics (what the trainer's logger looks for)."""
        return bool(getattr(self.planner, "diagnostics", False))

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        device = next(self._model.parameters()).device
        source = tensordict.get("observation").device
        if source == device:
            return self.sequence(tensordict)
        outputs = self.sequence(tensordict.select(*self.in_keys, strict=False).to(device))
        keys = list(self.out_keys)
        if self.diagnostics:  # ("planner", ...) entries are no declared output
            keys.append(self.planner.diagnostics_key)
        return tensordict.update(outputs.select(*keys, strict=False).to(source))


def _float64_logits(head: DreamerV3MLP, z: torch.Tensor) -> torch.Tensor:
    """``head(z)`` with every layer in float64.

    Not ``functional_call`` on float64 weights: TorchRL's DreamerV3 RMS norm computes in float32 whatever its input
    (it is written to keep bf16 activations stable), which rounds every hidden layer of a float64 pass back to float32.
    On the critic of tests/test_dreamer.py::test_heads_are_decoded_in_float64 (a fifth of its mass beyond
    ``|b| > 100``), the decoded change of a ``1e-6`` latent step was off by 9% of itself that way (54% in float32),
    and is off by 2e-9 this way.
    """
    x = z.double()
    for layer in head.model:
        if isinstance(layer, nn.Linear):
            x = F.linear(x, layer.weight.double(), None if layer.bias is None else layer.bias.double())
        elif isinstance(layer, _DreamerV3RMSNorm):
            x = F.rms_norm(x, (x.shape[-1],), layer.weight.double(), layer.eps)
        elif isinstance(layer, (nn.SiLU, nn.Identity)):
            x = layer(x)
        else:
            raise TypeError(f"decode_head evaluates Linear, RMS norm and SiLU layers in float64; this head has a "
                            f"{type(layer).__name__}.")
    return x


def _mode_straight_through(logits: torch.Tensor, unimix: float) -> torch.Tensor:
    """The most likely class of each categorical as a one-hot, with the straight-through gradient of its
    (unimix-mixed) probabilities: TorchRL's straight-through sample with the argmax in place of the draw."""
    probs = torch.softmax(logits, dim=-1)
    if unimix:
        probs = (1 - unimix) * probs + unimix / logits.shape[-1]
    one_hot = torch.nn.functional.one_hot(probs.argmax(-1), logits.shape[-1]).to(probs.dtype)
    return (probs + (one_hot - probs).detach()).flatten(-2)


# ---------------------------------------------------------------------------------------------------------------
class DreamerV3WorldModel(WorldModelBase):
    """DreamerV3 world model and actor-critic, for vector observations, planned in through :class:`WorldModelBase`.

    Parts (TorchRL's modules): ``encoder`` (symlog + :class:`~torchrl.modules.DreamerV3MLP`), ``prior``
    (:class:`~torchrl.modules.RSSMPriorV3`, block GRU), ``posterior`` (:class:`~torchrl.modules.RSSMPosteriorV3`),
    ``decoder``, ``reward_head`` (255 symexp two-hot bins), ``continue_head`` (continuation logit), ``actor``
    (tanh-squashed Gaussian) and ``critics`` (``num_critics`` value heads, 255 bins each).

    The planning view (what planners call; latents ``z = [state, belief]``):

    - ``next(z, a)``: the prior's GRU step and the *mode* of its categoricals, as a straight-through one-hot
      (gradients flow through the probabilities to the action). Deterministic, so a planner's objective is one
      function of its actions within a control step (DreamerV3's imagination samples instead; here a sample
      would change between Dream-MPC's gradient step and its ranking).
    - ``reward(z, a)``: the reward head on the *next* latent ``next(z, a)`` (the head is trained on the latent of
      the observation a reward leads to, DreamerV3's convention).
    - ``value(z, a)``: ``Q_k(z, a) = r + γ c V_k(z')`` on ``z' = next(z, a)``, with the continuation probability
      ``c`` and the discount ``γ`` the actor loss's λ-returns use (``discount``); ``reduce="avg"`` /
      ``"min"`` reduce over every critic.
    - ``termination(z)``: ``1 - c(z)``, from the continue head.
    - ``policy(z)``: the DreamerV3 actor.
    - ``encode(obs)``: the latent of ``obs`` as the first observation of an episode (the filter after a reset).
      An RSSM latent depends on the history, so the planners do not call it when acting: they read
      :attr:`latent_key`, written by :meth:`acting_module`'s state estimator, and ``encode`` serves history-free
      uses (``forward``, quick checks).

    Args:
        observation_spec / obs_dim: a TorchRL spec (its last dim is used) or an int.
        action_spec / action_dim: idem.
        model_size (str): a key of :data:`DREAMER_V3_SIZES` (``"cpu"``, ``"1m"`` (default), ``"12m"``, ...).
        **overrides: any :class:`DreamerV3Config` field (``num_critics``, ``discount``, ``deter``...).

    Examples:
        >>> wm = DreamerV3WorldModel(5, 1, model_size="cpu")
        >>> z = wm.encode(torch.randn(4, 5))
        >>> z.shape, wm.value(z, torch.zeros(4, 1), reduce="all").shape
        (torch.Size([4, 320]), torch.Size([2, 4, 1]))
    """

    latent_key = "latent"
    #: the model family (see :attr:`WorldModelBase.family`).
    family = "dreamer_v3"

    def __init__(self, observation_spec, action_spec, model_size: str = "1m", **overrides):
        super().__init__()
        cfg = DreamerV3Config.from_size(last_dim(observation_spec), last_dim(action_spec), model_size, **overrides)
        self.config = cfg
        self.obs_dim, self.action_dim = cfg.obs_dim, cfg.action_dim
        self.state_dim, self.belief_dim = cfg.stoch * cfg.classes, cfg.deter
        self.latent_dim = self.state_dim + self.belief_dim
        self.discount = cfg.discount
        L, eps = self.latent_dim, cfg.norm_eps

        def mlp(in_features, out_features, depth, **kw):
            return DreamerV3MLP(in_features, out_features, depth=depth, num_cells=cfg.units, norm_eps=eps, **kw)

        self.encoder = _SymlogEncoder(mlp(cfg.obs_dim, None, cfg.enc_layers))
        self.prior = RSSMPriorV3(
            action_shape=(cfg.action_dim,), action_dim=cfg.action_dim, hidden_dim=cfg.hidden,
            rnn_hidden_dim=cfg.deter, num_categoricals=cfg.stoch, num_classes=cfg.classes,
            # "gru" refuses inputs with more than one batch dim; planning rolls out [H, M] batches.
            recurrent_model="block_gru", num_blocks=cfg.blocks, num_layers=cfg.dyn_layers,
            prior_num_layers=cfg.img_layers, norm_eps=eps, unimix=cfg.unimix)
        self.posterior = RSSMPosteriorV3(
            hidden_dim=cfg.hidden, num_categoricals=cfg.stoch, num_classes=cfg.classes, rnn_hidden_dim=cfg.deter,
            obs_embed_dim=cfg.units, use_rms_norm=True, num_layers=cfg.obs_layers, norm_eps=eps, unimix=cfg.unimix)
        self.decoder = _SymexpDecoder(mlp(L, cfg.obs_dim, cfg.dec_layers))
        # [DreamerV3] rewhead / value outscale 0: zero-initialized output layers (predictions start at 0).
        self.reward_head = mlp(L, cfg.num_bins, cfg.reward_layers, outscale=0.0)
        self.continue_head = mlp(L, 1, cfg.cont_layers)
        self.actor = _ActorHead(mlp(L, 2 * cfg.action_dim, cfg.actor_layers, outscale=cfg.actor_outscale),
                                cfg.actor_min_std, cfg.actor_max_std)
        self.critics = nn.ModuleList(mlp(L, cfg.num_bins, cfg.critic_layers, outscale=0.0)
                                     for _ in range(cfg.num_critics))
        self.two_hot = SymExpTwoHot(cfg.num_bins)
        self.in_keys = ["observation"]
        self.out_keys = [self.latent_key]

    # ---- sizes and checks -------------------------------------------------------------------------------------
    @property
    def value_ensemble_size(self) -> int:
        return self.config.num_critics

    @property
    def num_params(self) -> int:
        return param_count(self)

    # ---- the planning view ------------------------------------------------------------------------------------
    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z -> (state, belief)``."""
        return z.split([self.state_dim, self.belief_dim], dim=-1)

    def reset_latent(self, batch_shape, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero ``(state, belief)``: the RSSM carry after a reset."""
        return (torch.zeros(*batch_shape, self.state_dim, device=device, dtype=dtype),
                torch.zeros(*batch_shape, self.belief_dim, device=device, dtype=dtype))

    def is_posterior(self, z: torch.Tensor) -> torch.Tensor:
        """``[*B, 1]``, true where ``z`` is a filtered latent ``[state, belief]``: finite, with a positive entry in
        every categorical of its state (a straight-through sample is one-hot up to rounding). False for the zeros
        a collector leaves where no policy acted (the seed phase's random steps), and for NaN."""
        state, _ = self.split(z)
        one_hots = state.reshape(*state.shape[:-1], self.config.stoch, self.config.classes)
        return (torch.isfinite(z).all(-1) & (one_hots.amax(-1) > 0).all(-1)).unsqueeze(-1)

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        state, belief = self.reset_latent(obs.shape[:-1], obs.device, obs.dtype)
        belief = self.prior._update_belief(state, belief, obs.new_zeros(*obs.shape[:-1], self.action_dim))
        logits = self.posterior._logits(belief, self.encoder(obs))
        return torch.cat([_mode_straight_through(logits, self.config.unimix), belief], dim=-1)

    def next(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        state, belief = self.split(z)
        # The logits without a draw (RSSMRolloutV3's own call): RSSMPriorV3.forward would consume the global RNG.
        logits, belief = self.prior._belief_and_logits(state, belief, a)
        return torch.cat([_mode_straight_through(logits, self.config.unimix), belief], dim=-1)

    def decode_head(self, head: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """A two-hot head's expected value ``[*B, 1]`` (reward or critic), evaluated in float64.

        The symexp bins reach ``±4.9e8``. A head that keeps a few percent of its mass beyond ``|b| > 100`` (measured:
        3.7% for the reward head of a cartpole model after 10k steps, whose decoded reward is ~0.06) decodes to the
        cancellation of terms summing to ~1e6 in absolute value, so the float32 rounding of its logits moves the
        decoded value by up to 0.3 between two inputs that differ by 1e-6 (benchmarks/dreamer_grad_check.py): the
        planners would rank candidates by rounding noise. In float64 the same change is ~2e-8. The heads are
        small (one to three layers), so the cost is low; training keeps float32 (the losses read the logits).
        Gradients reach the weights and ``z`` as through the float32 head.
        """
        return self.two_hot(_float64_logits(head, z)).to(z.dtype)

    def reward_from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Decoded reward head ``[*B, 1]`` on a latent (the reward of the transition that led to it)."""
        return self.decode_head(self.reward_head, z)

    def reward(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.reward_from_latent(self.next(z, a))

    def continuation(self, z: torch.Tensor) -> torch.Tensor:
        """Probability that the episode continues after ``z`` ``[*B, 1]``."""
        return torch.sigmoid(self.continue_head(z))

    def termination(self, z: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.continuation(z)

    def state_values(self, z: torch.Tensor) -> torch.Tensor:
        """Decoded value of every critic ``[K, *B, 1]``."""
        return torch.stack([self.decode_head(critic, z) for critic in self.critics])

    def _q_all(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        z_next = self.next(z, a)
        return self.reward_from_latent(z_next) + self.discount * self.continuation(z_next) * self.state_values(z_next)

    def value(self, z: torch.Tensor, a: torch.Tensor, reduce: str = "avg") -> torch.Tensor:
        if reduce not in ("all", "avg", "min"):
            raise ValueError(f"reduce must be 'all', 'avg' or 'min', got {reduce!r}")
        q = self._q_all(z, a)
        return q if reduce == "all" else (q.mean(0) if reduce == "avg" else q.min(0).values)

    def value_and_disagreement(self, z: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self._q_all(z, a)
        mean = q.mean(0)
        return mean, mean * q.std(0)

    def imagine(self, z0: torch.Tensor, actions: torch.Tensor, terminal_eps: torch.Tensor | None,
                weights: torch.Tensor, uncertainty: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The planners' objective (:meth:`~torchrl_dreammpc.planners.LatentPlannerBase.imagine`), fused.

        The generic path calls ``reward(z_t, a_t)`` and ``value(z_t, a_t)``, each of which steps the RSSM again to
        reach the successor their heads read; here each successor ``z_{t+1}`` (and ``z_{H+1} = next(z_H, π(z_H))``)
        is computed once and read by the reward, continue and critic heads. The values are the generic path's
        (tests/test_dreamer.py checks it): rewards, terminal value and penalty after the first predicted end
        (termination probability > 0.5) are dropped.
        """
        H, M = actions.shape[0], actions.shape[1]
        z = z0 if z0.shape[0] == M else z0.repeat_interleave(M // z0.shape[0], 0)
        successors = []
        for t in range(H):
            z = self.next(z, actions[t])
            successors.append(z)
        a_H = self.policy(z, deterministic=True)[0] if terminal_eps is None else self.policy(z, eps=terminal_eps)[0]
        successors.append(self.next(z, a_H))
        successors = torch.stack(successors)  # [H+1, M, L]: z_{t+1} for t = 0..H
        reward, cont = self.reward_from_latent(successors), self.continuation(successors)
        ended = ((1.0 - cont[:-1]) > 0.5).to(z.dtype).cumsum(0).clamp(max=1.0)  # ended at or before z_{t+1}
        alive = 1.0 - torch.cat([torch.zeros_like(ended[:1]), ended])  # [H+1, M, 1]
        weights = weights * alive
        if uncertainty:
            q = reward + self.discount * cont * self.state_values(successors)  # [K, H+1, M, 1]
            mean = q.mean(0)
            q_H, unc = mean[-1], (mean * q.std(0) * alive).sum(0)
        else:
            q_H = (reward[-1] + self.discount * cont[-1] * self.state_values(successors[-1])).mean(0)
            unc = None
        return (weights[:-1] * reward[:-1]).sum(0) + weights[-1] * q_H, unc

    def policy_params(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-squash mean and std of the actor."""
        return self.actor(z)

    def policy(self, z: torch.Tensor, deterministic: bool = False, eps: torch.Tensor | None = None):
        mean, std = self.policy_params(z)
        if deterministic:
            return torch.tanh(mean), torch.tanh(mean), std.log()
        if eps is None:
            eps = torch.randn_like(mean)
        return torch.tanh(mean + eps * std), torch.tanh(mean), std.log()

    # ---- acting with memory -----------------------------------------------------------------------------------
    def acting_transforms(self) -> list:
        """A :class:`~torchrl.envs.TensorDictPrimer` declaring the carry (``state``, ``belief``,
        ``previous_action``), zero at every reset. The env must also write ``"is_init"``
        (:class:`~torchrl.envs.InitTracker`; every :func:`~torchrl_dreammpc.envs.make_env` env does)."""
        return [TensorDictPrimer(state=Unbounded(self.state_dim), belief=Unbounded(self.belief_dim),
                                 previous_action=Unbounded(self.action_dim), random=False, default_value=0.0,
                                 expand_specs=True)]

    def acting_module(self, planner: TensorDictModuleBase) -> ActingPath:
        """The planner behind TorchRL's acting-time filter: one control step reads the carry and the observation,
        writes ``"latent"`` and the action, and the new carry into ``("next", ...)`` (an :class:`ActingPath`,
        which also moves the tensordict to the model's device and back).

        1. ``"observation"`` → ``"encoded_latents"`` (the encoder);
        2. :class:`~torchrl.modules.RSSMStateEstimatorV3`: zero the carry where ``"is_init"``, one GRU step from
           the previous ``state``/``belief``/``previous_action``, a posterior sample given the observation →
           ``("next", "state")``, ``("next", "belief")`` (the carry of the next step);
        3. ``[state, belief]`` → ``"latent"``, which the planner reads (``planner.latent_key``);
        4. the planner → ``"action"``; 5. ``"action"`` → ``("next", "previous_action")``.

        The env steps keep the ``("next", ...)`` entries written here (TorchRL merges a preset ``"next"`` before
        the transforms run), and :class:`~torchrl.envs.TensorDictPrimer` (:meth:`acting_transforms`) resets the
        carry to zeros at each reset. Batched envs (``[B]``) and unbatched ones (``[]``) both work.
        """
        if getattr(planner, "latent_key", None) != self.latent_key:
            raise ValueError(f"The planner must read the latent from {self.latent_key!r} (its latent_key is "
                             f"{getattr(planner, 'latent_key', None)!r}).")
        estimator = RSSMStateEstimatorV3(
            self.prior, self.posterior,
            in_keys=["state", "belief", "previous_action", "encoded_latents", "is_init"],
            out_keys=[("next", "state"), ("next", "belief")])
        return ActingPath(TensorDictSequential(
            TensorDictModule(self.encoder, in_keys=["observation"], out_keys=["encoded_latents"]),
            estimator,
            TensorDictModule(_Concat(), in_keys=[("next", "state"), ("next", "belief")], out_keys=[self.latent_key]),
            planner,
            TensorDictModule(_Clone(), in_keys=[planner.action_key], out_keys=[("next", "previous_action")]),
        ), planner, self)

    # ---- tensordict views for TorchRL's DreamerV3 losses (built on demand: the weights stay in this module) ---
    def sequence_model(self, first_key: NestedKey | None = None,
                       context_key: NestedKey | None = None) -> TensorDictSequential:
        """The world model over ``[B, T]`` replayed sequences, for :class:`~torchrl.objectives.DreamerV3ModelLoss`.

        Reads ``"observation"`` (the first row's, and, with ``first_key``, that of every row beginning an episode:
        where the RSSM starts from, see :class:`_ReplayRollout`), ``"action"`` and ``("next", "observation")``;
        writes ``("next", ...)``: ``prior_logits``, ``posterior_logits``, ``state``, ``belief``,
        ``reco_observation``, ``reward_logits``, ``reward``, ``continue_pred``. Row ``t``'s latent is that of the
        observation after its action, which its reward and end flags belong to.

        Args:
            first_key (NestedKey, optional): a boolean entry ``[B, T, 1]``, true on the rows that begin an episode,
                for sequences that cross episode ends. ``None`` (default): every sequence lies within one episode.
            context_key (NestedKey, optional): the posterior ``[state, belief]`` stored with each row (NaN where
                none was), where a sequence not beginning an episode starts from (DreamerV3's replay context,
                :class:`_ReplayRollout`). Needs ``first_key``. ``None`` (default): every sequence starts from the
                reset filter of its first observation.
        """
        if context_key is not None and first_key is None:
            raise ValueError("A replay context (context_key) needs first_key: a sequence that begins an episode "
                             "starts from the reset filter, not from a stored posterior.")
        nxt_latent = [("next", "state"), ("next", "belief")]
        rollout_in = ["observation", "action", ("next", "encoded_latents")] + [
            key for key in (first_key, context_key) if key is not None]
        return TensorDictSequential(
            TensorDictModule(self.encoder, in_keys=[("next", "observation")], out_keys=[("next", "encoded_latents")]),
            TensorDictModule(_ReplayRollout(self.encoder, self.prior, self.posterior, self.action_dim),
                             in_keys=rollout_in, out_keys=[("next", "prior_logits"), ("next", "posterior_logits"),
                                                           ("next", "state"), ("next", "belief")]),
            TensorDictModule(self.decoder, in_keys=nxt_latent, out_keys=[("next", "reco_observation")]),
            TensorDictModule(self.reward_head, in_keys=nxt_latent, out_keys=[("next", "reward_logits")]),
            TensorDictModule(self.two_hot, in_keys=[("next", "reward_logits")], out_keys=[("next", "reward")]),
            TensorDictModule(self.continue_head, in_keys=nxt_latent, out_keys=[("next", "continue_pred")]),
        )

    def actor_module(self) -> ProbabilisticTensorDictSequential:
        """The actor as TorchRL's probabilistic module over ``("state", "belief")`` (TanhNormal; writes
        ``"action"`` and ``"action_log_prob"``), for :class:`~torchrl.objectives.DreamerV3ActorLoss`."""
        return ProbabilisticTensorDictSequential(
            TensorDictModule(self.actor, in_keys=["state", "belief"], out_keys=["loc", "scale"]),
            ProbabilisticTensorDictModule(in_keys=["loc", "scale"], out_keys=["action"], distribution_class=TanhNormal,
                                          return_log_prob=True, log_prob_key="action_log_prob",
                                          default_interaction_type=InteractionType.RANDOM))

    def critic_modules(self) -> list[TensorDictSequential]:
        """One value module per critic (``("state", "belief")`` → ``state_value_logits``, ``state_value``), for
        :class:`~torchrl.objectives.DreamerV3ValueLoss`."""
        return [TensorDictSequential(
            TensorDictModule(critic, in_keys=["state", "belief"], out_keys=["state_value_logits"]),
            TensorDictModule(self.two_hot, in_keys=["state_value_logits"], out_keys=["state_value"]))
            for critic in self.critics]

    def critic_mean_module(self) -> TensorDictModule:
        """The ensemble's mean decoded value → ``"state_value"``."""
        return TensorDictModule(_CriticMean(self.critics, self.two_hot), in_keys=["state", "belief"],
                                out_keys=["state_value"])

    def continuation_module(self) -> TensorDictModule:
        """Continuation probability → ``"continuation"``, for the actor loss's λ-returns."""
        return TensorDictModule(_ContinueProbability(self.continue_head), in_keys=["state", "belief"],
                                out_keys=["continuation"])

    def imagination_env(self) -> DreamerEnv:
        """TorchRL's :class:`~torchrl.envs.model_based.DreamerEnv` over the prior (sampled transitions, as in
        DreamerV3's imagination) and the reward head, with this model's specs, on the model's current device."""
        transition = TensorDictModule(self.prior, in_keys=["state", "belief", "action"],
                                      out_keys=["_prior_logits", "state", "belief"])
        reward = TensorDictSequential(
            TensorDictModule(self.reward_head, in_keys=["state", "belief"], out_keys=["reward_logits"]),
            TensorDictModule(self.two_hot, in_keys=["reward_logits"], out_keys=["reward"]))
        device = next(self.parameters()).device  # the env's specs (and the rollout) live where the model is
        env = DreamerEnv(WorldModelWrapper(transition, reward), prior_shape=torch.Size([self.state_dim]),
                         belief_shape=torch.Size([self.belief_dim]), device=device)
        env.observation_spec = Composite(state=Unbounded(self.state_dim, device=device),
                                         belief=Unbounded(self.belief_dim, device=device), device=device)
        env.state_spec = env.observation_spec.clone()
        env.action_spec = Bounded(-1.0, 1.0, (self.action_dim,), device=device)
        env.reward_spec = Unbounded((1,), device=device)
        return env
