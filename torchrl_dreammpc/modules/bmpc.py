"""BMPC's world model: TD-MPC2's architecture with a state-value ensemble and BMPC's policy head.

Bootstrapped Model Predictive Control (Wang et al., ICLR 2025; public code github.com/wertyuilife2/bmpc, MIT,
``bmpc/common/world_model.py`` and ``config.yaml`` with ``use_v_instead_q: true``, ``bmpc: true``) keeps TD-MPC2's
encoder, latent dynamics and reward head and changes two heads:

- value: an ensemble of ``num_q = 2`` state-value heads ``V_k(z)`` (no action input; two-hot over 101 bins,
  dropout 0.01 on the first layer, a Polyak-averaged target copy); ``"avg"`` averages two random members;
- policy: ``mean = tanh(raw mean)``, ``action = clip(mean + σ ε, -1, 1)`` (no tanh on the sample), log σ squashed
  into ``[-3, 1]``, or into ``[-2, 1]`` for the exploration samples of the reanalyze planner
  (:meth:`BMPCWorldModel.exploration_prior`).

How it answers the planners' seam (:class:`~torchrl_dreammpc.modules.WorldModelBase`):

- :meth:`~BMPCWorldModel.state_value` is ``V(z)`` and :meth:`~BMPCWorldModel.trajectory_values` scores an imagined
  trajectory as BMPC does, ``V̄(z_H)`` with no policy call, and measures Dream-MPC's disagreement on the V
  ensemble at each latent ``z_0 .. z_H``; every planner therefore plans in this model unchanged.
- ``value(z, a)`` stays a state-action value, the one-step model backup ``r̂(z, a) + γ V(next(z, a))``: a caller
  that asks for ``Q(z, a)`` gets a Q, never a V that silently ignores its action. It is also BMPC's TD target:
  ``value(z, π(z), target=True)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule
from torch import nn

from torchrl_dreammpc.modules.base import _stacked
from torchrl_dreammpc.modules.layers import EnsembleMLP, mlp
from torchrl_dreammpc.modules.world_model import TDMPC2Config, TDMPC2WorldModel

__all__ = ["BMPCConfig", "BMPCWorldModel", "gaussian_entropy_terms"]


@dataclasses.dataclass
class BMPCConfig(TDMPC2Config):
    """Every size and constant of a :class:`BMPCWorldModel`: TD-MPC2's fields with BMPC's values (config.yaml:
    ``num_q: 2``, ``log_std_min: -3``, ``log_std_max: 1``, ``expl_log_std_min: -2``, ``expl_log_std_max: 1``).
    The model-size table is TD-MPC2's (BMPC's ``common/__init__.py`` is the same: sizes 1 and 317 set num_q 2 and 8)."""

    num_q: int = 2
    log_std_min: float = -3.0
    log_std_max: float = 1.0
    expl_log_std_min: float = -2.0
    expl_log_std_max: float = 1.0


class _Ensemble(nn.Module):
    """The V ensemble on the latent for tensordicts: heads moved next to the bins, ``[*B, K, bins]``."""

    def __init__(self, net: EnsembleMLP):
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).movedim(0, -2)


class _BMPCPolicyHead(nn.Module):
    """BMPC's Gaussian prior: ``(tanh(raw mean), log σ)`` with log σ squashed into ``[lo, hi]``, the acting range or
    the exploration range."""

    def __init__(self, net: nn.Module, log_std: tuple[float, float], expl_log_std: tuple[float, float]):
        super().__init__()
        self.net = net
        self.log_std_range, self.expl_log_std_range = log_std, expl_log_std
        self.explore = False  # set by BMPCWorldModel.exploration_prior

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(z).chunk(2, dim=-1)
        lo, hi = self.expl_log_std_range if self.explore else self.log_std_range
        return torch.tanh(mean), lo + 0.5 * (hi - lo) * (torch.tanh(log_std) + 1)


def gaussian_entropy_terms(log_std: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(entropy, scaled_entropy)`` of a Gaussian sample ``mean + σ ε`` as BMPC's policy reports them:
    ``entropy = -log N(ε; 0, 1)/σ`` summed over dimensions (no squashing correction: BMPC clips, it does not
    squash), ``scaled_entropy = entropy · A · log p / (log p + 1e-8)`` (TD-MPC2's action-dimension scaling);
    both ``[*B, 1]``."""
    logp = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1, keepdim=True)
    scale = logp * eps.shape[-1] / (logp + 1e-8)
    return -logp, -logp * scale


class BMPCWorldModel(TDMPC2WorldModel):
    """BMPC's world model: encoder, latent dynamics, reward, a state-value ensemble (+ target), BMPC's policy prior.

    Parts (each a :class:`~tensordict.nn.TensorDictModule`): ``encoder``, ``dynamics``, ``reward_head`` as in
    :class:`~torchrl_dreammpc.modules.TDMPC2WorldModel`; ``value_head``: latent → ``state_value_logits``
    ``[*B, K, bins]``; ``target_value_head``: → ``target_state_value_logits`` (buffers); ``policy_head``: latent →
    ``pi_mean`` (already ``tanh``-ed), ``pi_log_std``. No termination head: BMPC's model-based value target has
    no termination model (``episodic=True`` is refused).

    Args:
        observation_spec / obs_dim, action_spec / action_dim: a TorchRL spec (last dim) or an int.
        model_size (int): 1, 5 (default), 19, 48 or 317 (TD-MPC2's table; BMPC's default ``num_q`` is 2).
        **overrides: any :class:`BMPCConfig` field.

    Examples:
        >>> wm = BMPCWorldModel(5, 1, model_size=1)
        >>> z = wm.encode(torch.randn(4, 5))
        >>> wm.state_value(z, reduce="all").shape, wm.value(z, torch.zeros(4, 1)).shape
        (torch.Size([2, 4, 1]), torch.Size([4, 1]))
    """

    family = "bmpc"
    config_class = BMPCConfig

    def __init__(self, observation_spec, action_spec, model_size: int = 5, **overrides):
        if overrides.get("episodic"):
            raise ValueError("BMPCWorldModel has no termination model (BMPC's value target is model-based and its "
                             "code trains episodic tasks as if they continued): build it with episodic=False.")
        super().__init__(observation_spec, action_spec, model_size, **overrides)

    def _policy_head(self, cfg, hidden) -> TensorDictModule:
        head = _BMPCPolicyHead(mlp(cfg.latent_dim, hidden, 2 * cfg.action_dim), (cfg.log_std_min, cfg.log_std_max),
                               (cfg.expl_log_std_min, cfg.expl_log_std_max))
        return TensorDictModule(head, in_keys=["latent"], out_keys=["pi_mean", "pi_log_std"])

    def _value_heads(self, cfg, hidden) -> None:
        L = cfg.latent_dim
        self.value_head = TensorDictModule(_Ensemble(EnsembleMLP(cfg.num_q, L, hidden, cfg.num_bins, cfg.dropout)),
                                           in_keys=["latent"], out_keys=["state_value_logits"])
        self.target_value_head = TensorDictModule(
            _Ensemble(EnsembleMLP(cfg.num_q, L, hidden, cfg.num_bins, cfg.dropout, trainable=False)),
            in_keys=["latent"], out_keys=["target_state_value_logits"])

    # ---- handles on the raw networks ----
    @property
    def value_ensemble(self) -> EnsembleMLP:
        return self.value_head.module.net

    @property
    def target_value_ensemble(self) -> EnsembleMLP:
        return self.target_value_head.module.net

    def _target_value_module(self) -> nn.Module:
        return self.target_value_head

    @property
    def q_ensemble(self):
        raise AttributeError("BMPCWorldModel has no Q ensemble: its value ensemble (value_ensemble) is V(z).")

    target_q_ensemble = q_ensemble

    def _new_planning_ops(self):
        from torchrl_dreammpc.modules.planning import BMPCPlanningOps

        return BMPCPlanningOps(self)

    def planning_ops(self):
        ops = super().planning_ops()
        if ops is not self:
            ops.explore = self.policy_head.module.explore  # the prior's log-std range of this control step
        return ops

    @contextlib.contextmanager
    def exploration_prior(self):
        """Within the block the prior's log σ lies in the exploration range ``[expl_log_std_min, expl_log_std_max]``
        (BMPC samples the reanalyze planner's policy trajectories so: ``pi(..., expl=reanalyze)``).

        Examples:
            >>> wm = BMPCWorldModel(5, 1, model_size=1)
            >>> with wm.exploration_prior():
            ...     log_std = wm.policy_params(wm.encode(torch.zeros(1, 5)))[1]
        """
        head = self.policy_head.module
        previous, head.explore = head.explore, True
        try:
            yield self
        finally:
            head.explore = previous

    # ---- values ----
    def v_logits(self, z: torch.Tensor, target: bool = False, detach: bool = False,
                 members: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the V heads ``[K, *B, bins]``: online, online with detached weights, or target."""
        net = self.target_value_ensemble if target else self.value_ensemble
        return net(z, detach_params=detach, members=members)

    def state_value(self, z: torch.Tensor, eps: torch.Tensor | None = None, reduce: str = "avg",
                    target: bool = False, detach: bool = False) -> torch.Tensor:
        """``V(z)``: every member ``[K, *B, 1]`` (``"all"``), or the mean / min of two random members ``[*B, 1]``
        (BMPC's ``V(z, return_type)``). ``eps`` is not used (no policy call)."""
        if reduce == "all":
            return self.two_hot.decode(self.v_logits(z, target, detach))
        if reduce not in ("avg", "min"):
            raise ValueError(f"reduce must be 'all', 'avg' or 'min', got {reduce!r}")
        v = self.two_hot.decode(self.v_logits(z, target, detach, members=self._two_random_heads(z.device)))
        return v.min(0).values if reduce == "min" else v.mean(0)

    def value(self, z: torch.Tensor, a: torch.Tensor, reduce: str = "avg", target: bool = False) -> torch.Tensor:
        """State-action value by a one-step model backup: ``r̂(z, a) + γ V(next(z, a))`` (``V`` reduced as in
        :meth:`state_value`; ``"all"``: ``[K, *B, 1]``, one backup per V member). With ``target=True`` and
        ``a ~ π(z)`` this is BMPC's TD target."""
        return self.reward(z, a) + self.discount * self.state_value(self.next(z, a), reduce=reduce, target=target)

    def trajectory_values(self, zs, actions: torch.Tensor, terminal_eps: torch.Tensor | None = None,
                          uncertainty: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """BMPC's terminal value ``V̄(z_H)`` (no policy call) and, with ``uncertainty``, the disagreement
        ``mean_k V_k(z_t) · std_k V_k(z_t)`` at ``z_0 .. z_H`` (one V pass over all of them)."""
        if not uncertainty:
            return self.state_value(zs[-1]), None
        v = self.state_value(_stacked(zs), reduce="all")  # [K, H+1, M, 1]
        idx = self._two_random_heads(v.device)
        v_H = (v[:, -1] if idx is None else v[idx, -1]).mean(0)
        std, mean = torch.std_mean(v, 0)
        return v_H, mean * std

    def value_and_disagreement(self, z: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The backup's disagreement over the V members of next(z, a), from one pass.
        q = self.value(z, a, reduce="all")
        idx = self._two_random_heads(z.device)
        return (q if idx is None else q[idx]).mean(0), q.mean(0) * q.std(0)

    # ---- policy ----
    def policy_params(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tanh(raw mean), log σ)`` of the prior (log σ in the acting or, inside :meth:`exploration_prior`, the
        exploration range)."""
        return self.policy_head.module(z)

    def policy(self, z: torch.Tensor, deterministic: bool = False, eps: torch.Tensor | None = None):
        mean, log_std = self.policy_params(z)
        if deterministic:
            return mean, mean, log_std
        if eps is None:
            eps = torch.randn_like(mean)
        return (mean + eps * log_std.exp()).clamp(-1.0, 1.0), mean, log_std

    def policy_with_entropy(self, z: torch.Tensor, eps: torch.Tensor | None = None):
        """A sample with BMPC's entropy terms: ``(action, entropy, scaled_entropy)`` (see
        :func:`gaussian_entropy_terms`)."""
        mean, log_std = self.policy_params(z)
        if eps is None:
            eps = torch.randn_like(mean)
        entropy, scaled = gaussian_entropy_terms(log_std, eps)
        return (mean + eps * log_std.exp()).clamp(-1.0, 1.0), entropy, scaled

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        tensordict = super().forward(tensordict)
        tensordict.set("state_value", self.state_value(tensordict.get("latent")))
        return tensordict
