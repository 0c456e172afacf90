"""TD-MPC2's implicit latent world model (state observations) as TensorDictModules.

Architecture and sizes follow the TD-MPC2 paper (Hansen, Su & Wang, ICLR 2024, Table/Appendix on model sizes)
and its public code: SimNorm latents, LayerNorm+Mish MLPs, an ensemble of Q heads with dropout 0.01 on the first
layer, target Qs, a squashed-Gaussian policy prior with log-std squashed into [-10, 2], and two-hot regression of
reward and value over 101 symlog-space bins on [-10, 10].
"""
from __future__ import annotations

import dataclasses
import math
import weakref

import torch
from tensordict.nn import TensorDictModule
from torch import nn

from torchrl_dreammpc._checks import check_bool, check_float, check_int
from torchrl_dreammpc.modules.base import WorldModelBase, last_dim
from torchrl_dreammpc.modules.layers import EnsembleMLP, SimNorm, mlp, param_count, weight_init
from torchrl_dreammpc.modules.two_hot import SymlogTwoHot

__all__ = ["TDMPC2WorldModel", "TDMPC2Config", "MODEL_SIZES", "discount_from_episode_length"]

# TD-MPC2's model-size table (public code, common/__init__.py; paper appendix). Unlisted fields take the
# TDMPC2Config defaults (e.g. num_q=5).
MODEL_SIZES: dict[int, dict[str, int]] = {
    1: dict(enc_dim=256, mlp_dim=384, latent_dim=128, num_enc_layers=2, num_q=2),
    5: dict(enc_dim=256, mlp_dim=512, latent_dim=512, num_enc_layers=2),
    19: dict(enc_dim=1024, mlp_dim=1024, latent_dim=768, num_enc_layers=3),
    48: dict(enc_dim=1792, mlp_dim=1792, latent_dim=768, num_enc_layers=4),
    317: dict(enc_dim=4096, mlp_dim=4096, latent_dim=1376, num_enc_layers=5, num_q=8),
}


# model -> (module epoch, weight slots, their storage pointers, TDMPC2PlanningOps); kept outside the module so that
# it is never pickled or deep-copied with it.
_PLANNING_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# Bumped whenever a submodule is assigned anywhere (a replaced layer invalidates the planning caches).
_MODULE_EPOCH = [0]


def _bump_module_epoch(module, name, submodule):
    _MODULE_EPOCH[0] += 1


nn.modules.module.register_module_module_registration_hook(_bump_module_epoch)


def discount_from_episode_length(episode_length: int, denom: float = 5.0, low: float = 0.95,
                                 high: float = 0.995) -> float:
    """TD-MPC2's discount heuristic: ``(L/5 - 1) / (L/5)`` clipped to [0.95, 0.995] (500 steps → 0.99)."""
    frac = episode_length / denom
    return float(min(max((frac - 1) / frac, low), high))


@dataclasses.dataclass
class TDMPC2Config:
    """Every size and constant of a :class:`TDMPC2WorldModel` (saved in checkpoints to refuse mismatches)."""

    obs_dim: int
    action_dim: int
    model_size: int = 5
    enc_dim: int = 256
    mlp_dim: int = 512
    latent_dim: int = 512
    num_enc_layers: int = 2
    num_q: int = 5
    num_bins: int = 101
    vmin: float = -10.0
    vmax: float = 10.0
    simnorm_dim: int = 8
    dropout: float = 0.01
    log_std_min: float = -10.0
    log_std_max: float = 2.0
    episodic: bool = False
    discount: float = 0.99

    def __post_init__(self) -> None:
        """Refuses a value the model cannot be built with, naming it (before any layer is allocated)."""
        for name in ("obs_dim", "action_dim", "model_size", "enc_dim", "mlp_dim", "latent_dim", "num_enc_layers",
                     "num_q", "simnorm_dim"):
            check_int(name, getattr(self, name), 1)
        check_int("num_bins", self.num_bins, 2)
        if self.latent_dim % self.simnorm_dim:
            raise ValueError(f"latent_dim must be a multiple of simnorm_dim={self.simnorm_dim} (SimNorm normalizes "
                             f"groups of {self.simnorm_dim} latent features), got latent_dim={self.latent_dim}.")
        check_float("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        for low, high in (("vmin", "vmax"), ("log_std_min", "log_std_max")):
            if check_float(low, getattr(self, low)) >= check_float(high, getattr(self, high)):
                raise ValueError(f"{low} must be < {high}, got {low}={getattr(self, low)!r}, "
                                 f"{high}={getattr(self, high)!r}.")
        check_bool("episodic", self.episodic)
        check_float("discount", self.discount, low=0.0, high=1.0, low_open=True)

    @classmethod
    def from_size(cls, obs_dim: int, action_dim: int, model_size: int = 5, **overrides) -> "TDMPC2Config":
        if model_size not in MODEL_SIZES:
            raise ValueError(f"Unknown model_size {model_size!r}; choose one of {sorted(MODEL_SIZES)} (millions of parameters).")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"Unknown TDMPC2Config field(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(obs_dim=obs_dim, action_dim=action_dim, model_size=model_size,
                   **{**MODEL_SIZES[model_size], **overrides})


class _Concat(nn.Module):
    """Runs ``net`` on the concatenation of its inputs (latent and action)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat(xs, dim=-1))


class _ConcatEnsemble(_Concat):
    """Q ensemble on (latent, action) for tensordicts: heads moved next to the bins, ``[*B, K, bins]``, so the
    leading dims stay the tensordict's batch dims (the tensor-level methods keep TD-MPC2's ``[K, *B, bins]``)."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return super().forward(*xs).movedim(0, -2)


class _PolicyHead(nn.Module):
    """Gaussian policy prior parameters: pre-squash mean and log-std squashed into [log_std_min, log_std_max]."""

    def __init__(self, net: nn.Module, log_std_min: float, log_std_max: float):
        super().__init__()
        self.net = net
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(z).chunk(2, dim=-1)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(log_std) + 1)
        return mean, log_std


class TDMPC2WorldModel(WorldModelBase):
    """TD-MPC2 world model: encoder, latent dynamics, reward, Q ensemble (+ targets), policy prior.

    Each part is a :class:`~tensordict.nn.TensorDictModule` with explicit keys (``encoder``: observation →
    latent; ``dynamics``: (latent, action) → next_latent; ``reward_head``: → reward_logits; ``qvalue``:
    → q_logits ``[*B, K, bins]``; ``target_qvalue``: → target_q_logits; ``policy_head``: latent → pi_mean,
    pi_log_std; ``termination_head`` for episodic tasks). The tensor-level methods of
    :class:`~torchrl_dreammpc.modules.WorldModelBase` are what planners and losses call.

    The whole model as a module: ``forward(td)`` writes ``"latent"`` from ``"observation"`` and, if ``"action"``
    is present, ``"next_latent"``, ``"reward"`` (decoded) and ``"state_action_value"`` (avg of two heads).

    Args:
        observation_spec / obs_dim: a TorchRL spec (its last dim is used) or an int.
        action_spec / action_dim: idem.
        model_size (int): 1, 5 (default), 19, 48 or 317 (millions of parameters, TD-MPC2's table).
        **overrides: any :class:`TDMPC2Config` field (``num_q``, ``latent_dim``, ``episodic``, ``discount``...).

    Examples:
        >>> wm = TDMPC2WorldModel(5, 1, model_size=1)
        >>> z = wm.encode(torch.randn(4, 5))
        >>> wm.value(z, torch.zeros(4, 1), reduce="all").shape
        torch.Size([2, 4, 1])
    """

    #: the model family (see :attr:`WorldModelBase.family`).
    family = "tdmpc2"
    #: the config dataclass of the family (sizes and constants, saved in checkpoints); a subclass family changes it.
    config_class = TDMPC2Config

    def __init__(self, observation_spec, action_spec, model_size: int = 5, **overrides):
        super().__init__()
        cfg = self.config_class.from_size(last_dim(observation_spec), last_dim(action_spec), model_size,
                                          **overrides)
        self.config = cfg
        self.obs_dim, self.action_dim, self.latent_dim = cfg.obs_dim, cfg.action_dim, cfg.latent_dim
        self.discount = cfg.discount
        za = cfg.latent_dim + cfg.action_dim
        hidden = [cfg.mlp_dim, cfg.mlp_dim]
        self.encoder = TensorDictModule(
            mlp(cfg.obs_dim, max(cfg.num_enc_layers - 1, 1) * [cfg.enc_dim], cfg.latent_dim, SimNorm(cfg.simnorm_dim)),
            in_keys=["observation"], out_keys=["latent"])
        self.dynamics = TensorDictModule(_Concat(mlp(za, hidden, cfg.latent_dim, SimNorm(cfg.simnorm_dim))),
                                         in_keys=["latent", "action"], out_keys=["next_latent"])
        self.reward_head = TensorDictModule(_Concat(mlp(za, hidden, cfg.num_bins)),
                                            in_keys=["latent", "action"], out_keys=["reward_logits"])
        self.termination_head = (TensorDictModule(mlp(cfg.latent_dim, hidden, 1), in_keys=["latent"],
                                                  out_keys=["termination_logits"]) if cfg.episodic else None)
        self.policy_head = self._policy_head(cfg, hidden)
        self._value_heads(cfg, hidden)
        self.two_hot = SymlogTwoHot(cfg.num_bins, cfg.vmin, cfg.vmax)
        self.apply(weight_init)
        with torch.no_grad():  # TD-MPC2 zero-initializes the reward and value output layers
            self.reward_head.module.net[-1].weight.zero_()
            getattr(self.value_ensemble, f"weight_{self.value_ensemble.num_layers - 1}").zero_()
            self.target_value_ensemble.load_state_dict(self.value_ensemble.state_dict())
        self.in_keys = ["observation"]
        self.out_keys = ["latent"]

    def _policy_head(self, cfg, hidden) -> TensorDictModule:
        return TensorDictModule(
            _PolicyHead(mlp(cfg.latent_dim, hidden, 2 * cfg.action_dim), cfg.log_std_min, cfg.log_std_max),
            in_keys=["latent"], out_keys=["pi_mean", "pi_log_std"])

    def _value_heads(self, cfg, hidden) -> None:
        """The Q ensemble on (latent, action) and its target copy (buffers): ``qvalue`` / ``target_qvalue``."""
        za = cfg.latent_dim + cfg.action_dim
        self.qvalue = TensorDictModule(_ConcatEnsemble(EnsembleMLP(cfg.num_q, za, hidden, cfg.num_bins, cfg.dropout)),
                                       in_keys=["latent", "action"], out_keys=["q_logits"])
        self.target_qvalue = TensorDictModule(
            _ConcatEnsemble(EnsembleMLP(cfg.num_q, za, hidden, cfg.num_bins, cfg.dropout, trainable=False)),
            in_keys=["latent", "action"], out_keys=["target_q_logits"])

    @classmethod
    def from_tdmpc2_checkpoint(cls, path_or_state_dict, obs_dim=None, action_dim=None, **kwargs) -> "TDMPC2WorldModel":
        """Build a model from a checkpoint of TD-MPC2's public code (sizes inferred, every tensor mapped, eval mode).

        Thin wrapper of :func:`torchrl_dreammpc.checkpoints.from_tdmpc2_checkpoint`; see it for the keyword
        arguments (``model_size``, ``episode_length``, ``discount``, ``device``, ``strict``) and the errors raised.

        Examples:
            >>> from torchrl_dreammpc.envs import task_info
            >>> wm = TDMPC2WorldModel.from_tdmpc2_checkpoint(  # 500 agent steps on DMC: discount 0.99
            ...     "cartpole-swingup-1.pt", obs_dim=5, action_dim=1,
            ...     episode_length=task_info("cartpole-swingup").episode_length)  # doctest: +SKIP
        """
        from torchrl_dreammpc.checkpoints import from_tdmpc2_checkpoint  # checkpoints.py imports this module

        return from_tdmpc2_checkpoint(path_or_state_dict, obs_dim, action_dim, **kwargs)

    # ---- direct handles on the raw networks (no tensordict in the hot paths) ----
    @property
    def q_ensemble(self) -> EnsembleMLP:
        return self.qvalue.module.net

    @property
    def target_q_ensemble(self) -> EnsembleMLP:
        return self.target_qvalue.module.net

    @property
    def value_ensemble(self) -> EnsembleMLP:
        """The trained value ensemble of the family (TD-MPC2: the Q heads)."""
        return self.q_ensemble

    @property
    def target_value_ensemble(self) -> EnsembleMLP:
        """Its Polyak-averaged target copy (buffers)."""
        return self.target_q_ensemble

    def world_model_parameters(self):
        """Parameter groups for the world-model optimizer: ``(encoder params, the rest except the policy)``."""
        enc = list(self.encoder.parameters())
        rest = [p for m in (self.dynamics, self.reward_head, self.termination_head) if m is not None
                for p in m.parameters()]
        return enc, rest + list(self.value_ensemble.parameters())

    def planning_ops(self):
        """A :class:`~torchrl_dreammpc.modules.planning.TDMPC2PlanningOps` view of this model (same tensor methods
        and results, fewer kernels, weights detached) for the planners' inner loops; the model itself in
        ``train()`` mode (the view has no dropout).

        Cached: the cache is checked (a few microseconds) against the storage of every weight, so a weight
        replaced or moved (``.to()``, ``param.data = ...``, a new ``Parameter``, a new submodule) rebuilds it,
        and in-place updates (optimizer steps, ``load_state_dict``, target updates) are seen through it at once.
        """
        if self.training or self.value_ensemble.training:
            return self
        cache = _PLANNING_CACHE.get(self)
        if cache is not None and cache[0] == _MODULE_EPOCH[0]:
            _, slots, ptrs, ops = cache
            if all(d[n].data_ptr() == p for (d, n), p in zip(slots, ptrs)):
                return ops
        slots = [(m._parameters, n) for m in self.modules() for n, t in m._parameters.items() if t is not None]
        slots.append((self.two_hot._buffers, "bins"))
        with torch.inference_mode(False):
            ops = self._new_planning_ops()
        _PLANNING_CACHE[self] = (_MODULE_EPOCH[0], slots, [d[n].data_ptr() for d, n in slots], ops)
        return ops

    def _new_planning_ops(self):
        from torchrl_dreammpc.modules.planning import TDMPC2PlanningOps

        return TDMPC2PlanningOps(self)

    def policy_parameters(self):
        return list(self.policy_head.parameters())

    @property
    def value_ensemble_size(self) -> int:
        return self.config.num_q

    @property
    def num_params(self) -> int:
        return param_count(self)

    def train(self, mode: bool = True):
        super().train(mode)
        self._target_value_module().train(False)  # targets never use dropout
        return self

    def _target_value_module(self) -> nn.Module:
        return self.target_qvalue

    # ---- the planner / loss interface ----
    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        return self.encoder.module(obs)

    def next(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.dynamics.module(z, a)

    def reward_logits(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.reward_head.module(z, a)

    def reward(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.two_hot.decode(self.reward_logits(z, a))

    def q_logits(self, z: torch.Tensor, a: torch.Tensor, target: bool = False, detach: bool = False,
                 members: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the Q heads ``[K, *B, bins]``: online, online with detached weights, or target."""
        net = self.target_q_ensemble if target else self.q_ensemble
        return net(torch.cat([z, a], dim=-1), detach_params=detach, members=members)

    def value(self, z: torch.Tensor, a: torch.Tensor, reduce: str = "avg", target: bool = False,
              detach: bool = False) -> torch.Tensor:
        if reduce == "all":
            return self.two_hot.decode(self.q_logits(z, a, target, detach))
        if reduce not in ("avg", "min"):
            raise ValueError(f"reduce must be 'all', 'avg' or 'min', got {reduce!r}")
        # TD-MPC2 reduces over two randomly chosen heads (REDQ-style); only those two are evaluated.
        q = self.two_hot.decode(self.q_logits(z, a, target, detach, members=self._two_random_heads(z.device)))
        return q.min(0).values if reduce == "min" else q.mean(0)

    def value_and_disagreement(self, z: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One ensemble pass: the avg of two random heads and mean*std over all heads come from the same logits.
        q = self.two_hot.decode(self.q_logits(z, a))
        idx = self._two_random_heads(z.device)
        return (q if idx is None else q[idx]).mean(0), q.mean(0) * q.std(0)

    def _two_random_heads(self, device) -> torch.Tensor | None:
        """Indices of two distinct random Q heads, or None when the ensemble has only two.
        (``narrow`` rather than ``[:2]``: inductor in torch 2.13 fails on a slice of ``randperm``.)"""
        k = self.config.num_q
        return None if k <= 2 else torch.randperm(k, device=device).narrow(0, 0, 2)

    def policy_params(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-squash mean and squashed log-std of the policy prior."""
        return self.policy_head.module(z)

    def policy(self, z: torch.Tensor, deterministic: bool = False, eps: torch.Tensor | None = None):
        mean, log_std = self.policy_params(z)
        if deterministic:
            return torch.tanh(mean), torch.tanh(mean), log_std
        if eps is None:
            eps = torch.randn_like(mean)
        return torch.tanh(mean + eps * log_std.exp()), torch.tanh(mean), log_std

    def policy_with_entropy(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A reparameterized sample with its entropy terms, as TD-MPC2's policy loss uses them.

        Returns ``(action, entropy, scaled_entropy)``. ``entropy = -log π(a|z)`` with the tanh correction;
        ``scaled_entropy`` follows TD-MPC2's formula, ``entropy * (A * logp_gauss) / (logp_squashed + 1e-8)``
        (A = action dim), i.e. the entropy rescaled by the action dimension.
        """
        mean, log_std = self.policy_params(z)
        eps = torch.randn_like(mean)
        gauss_logp = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1, keepdim=True)
        pre = mean + eps * log_std.exp()
        action = torch.tanh(pre)
        logp = gauss_logp - torch.log(torch.relu(1 - action.pow(2)) + 1e-6).sum(-1, keepdim=True)
        entropy_scale = gauss_logp * self.action_dim / (logp + 1e-8)
        return action, -logp, -logp * entropy_scale

    def termination_logits(self, z: torch.Tensor) -> torch.Tensor:
        if self.termination_head is None:
            raise RuntimeError("This world model has no termination head (built with episodic=False).")
        return self.termination_head.module(z)

    def termination(self, z: torch.Tensor) -> torch.Tensor | None:
        return None if self.termination_head is None else torch.sigmoid(self.termination_logits(z))

    @torch.no_grad()
    def soft_update_targets(self, tau: float) -> None:
        """Polyak-average the target values towards the online ones (TorchRL's SoftUpdate does this in training)."""
        for t, s in zip(self.target_value_ensemble.buffers(), self.value_ensemble.parameters()):
            t.lerp_(s, tau)
