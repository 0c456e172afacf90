"""BMPC's losses as TorchRL ``LossModule``s (Bootstrapped Model Predictive Control, Wang et al., ICLR 2025).

Two modules, as for TD-MPC2 (world model first, then the policy on the updated model):

- :class:`BMPCLoss` — consistency, reward and state-value losses over sub-trajectories of H transitions, with
  BMPC's model-based value target ``y = r̂(z, a) + γ V̄_target(next(z, a))``, ``a ~ π(z)``, ``z = encode(o)``;
- :class:`BMPCPolicyLoss` — the policy imitates the planner ("expert"): per action dimension
  ``KL(N(μ_π, σ_π) ‖ N(μ_E, σ_E))``, averaged over dimensions, divided by a running scale, minus an entropy bonus.

Every constant is BMPC's (public code github.com/wertyuilife2/bmpc, MIT: ``bmpc/bmpc.py`` ``_td_target_V``,
``_update``, ``update_pi``; ``config.yaml``): consistency 20, reward 0.1, value 0.1, rho 0.5, entropy 1e-4,
``td_horizon`` 1, the running KL scale of TD-MPC2 (5th-95th percentile range of the first step, EMA 0.01, min 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictParams
from tensordict.utils import NestedKey

from torchrl_dreammpc.modules.bmpc import BMPCWorldModel, gaussian_entropy_terms
from torchrl_dreammpc.objectives.tdmpc2 import (PolicyPriorLoss, TDMPC2Loss, _rho_weights, ensemble_value_ce,
                                                 latent_rollout_losses)

__all__ = ["BMPCLoss", "BMPCPolicyLoss", "normal_kl", "expert_or_standard_normal"]


def normal_kl(loc_p: torch.Tensor, scale_p: torch.Tensor, loc_q: torch.Tensor, scale_q: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(N(loc_p, scale_p) ‖ N(loc_q, scale_q))``: ``½ (r + ((μp-μq)/σq)² - 1 - log r)`` with
    ``r = (σp/σq)²``, the expression (and the operation order) of ``torch.distributions.kl_divergence`` for two
    ``Normal``s, without building distribution objects (whose argument validation syncs a device)."""
    var_ratio = (scale_p / scale_q).pow(2)
    t1 = ((loc_p - loc_q) / scale_q).pow(2)
    return 0.5 * (var_ratio + t1 - 1 - var_ratio.log())


def expert_or_standard_normal(loc: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert distribution where there is one; ``N(0, 1)`` where ``loc`` is NaN (transitions no planner
    produced: random seed steps, the policy prior acting, not yet reanalyzed), as BMPC's ``update`` does, and
    where ``scale`` is not positive (no planner distribution has a zero std; such a row would make the KL NaN)."""
    missing = torch.isnan(loc) | ~(scale > 0)
    return torch.where(missing, torch.zeros_like(loc), loc), torch.where(missing, torch.ones_like(scale), scale)


class BMPCLoss(TDMPC2Loss):
    """BMPC world-model + state-value loss.

    Reads the same ``[B, H]`` sub-trajectories as :class:`~torchrl_dreammpc.objectives.TDMPC2Loss` (``observation``,
    ``action``, ``("next", "observation")``, ``("next", "reward")``, and ``("next", "terminated")``, which is checked
    like TDMPC2Loss's but not used: BMPC has no termination model). With ``z_t = encode(o_t)`` for the H+1
    observations (no gradient):

    - consistency: MSE between the latent rollout ``ẑ_{t+1} = next(ẑ_t, a_t)`` from ``ẑ_0 = z_0`` and ``z_{t+1}``;
    - reward: soft cross-entropy of ``r̂(ẑ_t, a_t)`` against the stored reward;
    - value: soft cross-entropy of EVERY V head at ``ẑ_t`` against ``y_t = r̂(z_t, a) + γ V̄_target(next(z_t, a))``,
      ``a ~ π(z_t)`` (BMPC's ``_td_target_V`` with ``td_horizon`` 1: the predicted reward, not the stored one; the
      mean of two random target heads).

    Each is weighted by ``rho**t`` and averaged over the horizon (and the value loss over the heads). Output keys
    as :class:`TDMPC2Loss` (``loss_*`` already multiplied by their coefficients, unweighted terms, ``"latents"``
    ``[H+1, B, L]`` detached) plus ``"value_target"`` (mean of ``y``, detached).

    The V ensembles are registered as ``value_params`` / ``target_value_params`` for TorchRL's
    ``SoftUpdate(loss, tau=0.01)`` (BMPC's ``soft_update_target_Q``).

    Args:
        world_model (BMPCWorldModel): the model to train.
        consistency_coef, reward_coef, value_coef (float): BMPC: 20, 0.1, 0.1.
        rho (float): temporal weight (0.5).
        discount (float, optional): defaults to ``world_model.discount``.
        validate (bool): check shapes and finiteness of every batch.

    Examples:
        >>> from torchrl_dreammpc.modules import BMPCWorldModel
        >>> wm = BMPCWorldModel(5, 1, model_size=1)
        >>> B, H = 4, 3
        >>> td = TensorDict({"observation": torch.randn(B, H, 5), "action": torch.rand(B, H, 1) * 2 - 1,
        ...     "next": {"observation": torch.randn(B, H, 5), "reward": torch.randn(B, H, 1),
        ...              "terminated": torch.zeros(B, H, 1, dtype=torch.bool)}}, [B, H])
        >>> sorted(k for k in BMPCLoss(wm)(td).keys() if k.startswith("loss_"))
        ['loss_consistency', 'loss_reward', 'loss_value']
    """

    def __init__(self, world_model: BMPCWorldModel, *, consistency_coef: float = 20.0, reward_coef: float = 0.1,
                 value_coef: float = 0.1, rho: float = 0.5, discount: float | None = None, validate: bool = True):
        if not isinstance(world_model, BMPCWorldModel):
            raise TypeError(f"BMPCLoss trains a BMPCWorldModel (state values); got {type(world_model).__name__} "
                            "(train a TDMPC2WorldModel with TDMPC2Loss).")
        super().__init__(world_model, consistency_coef=consistency_coef, reward_coef=reward_coef,
                         value_coef=value_coef, rho=rho, discount=discount, validate=validate)

    def _register_targets(self, world_model) -> None:
        self.value_params = TensorDictParams(TensorDict.from_module(world_model.value_ensemble), no_convert=True)
        self.target_value_params = TensorDictParams(
            TensorDict.from_module(world_model.target_value_ensemble), no_convert=True)
        self._has_update_associated["value"] = False

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        wm = self.world_model
        obs0, action, next_obs, reward, _ = self._read(tensordict)

        with torch.no_grad():
            true_zs = wm.encode(torch.cat([obs0.unsqueeze(0), next_obs]))  # [H+1, B, L]
            next_z = true_zs[1:]
            z = true_zs[:-1]
            # BMPC's target r̂(z, a) + γ V̄_target(next(z, a)), a ~ π(z) (wm.value with this loss's discount)
            pi_action = wm.policy(z)[0]
            next_value = wm.state_value(wm.next(z, pi_action), reduce="avg", target=True)
            td_target = wm.reward(z, pi_action) + self.discount * next_value  # [H, B, 1]

        zs, w, consistency, reward_ce = latent_rollout_losses(wm, obs0, action, next_z, reward, self.rho)
        value_ce = ensemble_value_ce(wm, wm.v_logits(zs[:-1]), td_target, w)  # V logits [K, H, B, bins]
        return TensorDict({
            "loss_consistency": self.consistency_coef * consistency,
            "loss_reward": self.reward_coef * reward_ce,
            "loss_value": self.value_coef * value_ce,
            "consistency": consistency.detach(),
            "reward_ce": reward_ce.detach(),
            "value_ce": value_ce.detach(),
            "value_target": td_target.mean(),
            self.tensor_keys.latents: zs.detach(),
        }, batch_size=[])


class BMPCPolicyLoss(PolicyPriorLoss):
    """BMPC's policy loss: imitate the planner's action distribution along the latent rollout.

    With ``z_t`` the first H latents of the detached rollout (``"latents"`` ``[H+1, B, L]`` from :class:`BMPCLoss`),
    ``(μ_π, σ_π) = π(z_t)`` (``μ_π`` already ``tanh``-ed) and the expert ``(μ_E, σ_E)`` of the transition's state
    (``N(0, 1)`` where it is NaN, :func:`expert_or_standard_normal`):

    ``kl_t = mean_a KL(N(μ_π, σ_π) ‖ N(μ_E, σ_E))``; the running scale ``S`` is updated with ``kl_0`` (5th-95th
    percentile range over the batch, EMA ``scale_tau``, at least 1) and then ``loss = mean_t rho**t mean_b
    (kl_t / S - entropy_coef · scaled_entropy_t)``, the entropy of a reparameterized sample (BMPC's ``update_pi``).

    Args:
        world_model (BMPCWorldModel): the model whose policy head is trained.
        entropy_coef (float): BMPC: 1e-4.
        rho (float): temporal weight (0.5).
        scale_tau (float): rate of the running KL scale (BMPC reuses tau = 0.01).

    Input keys (time-major, configurable with ``set_keys``): ``"latents"`` ``[H+1, B, L]``, ``"expert_loc"`` and
    ``"expert_scale"`` ``[H, B, A]``.

    Examples:
        >>> from torchrl_dreammpc.modules import BMPCWorldModel
        >>> wm = BMPCWorldModel(5, 1, model_size=1)
        >>> td = TensorDict({"latents": wm.encode(torch.randn(4, 8, 5)), "expert_loc": torch.zeros(3, 8, 1),
        ...                  "expert_scale": torch.ones(3, 8, 1)}, [])
        >>> BMPCPolicyLoss(wm)(td)["loss_pi"].shape
        torch.Size([])
    """

    @dataclass
    class _AcceptedKeys:
        """Tensordict keys, configurable with ``set_keys``.

        Attributes:
            latents: the detached latent rollout ``[H+1, B, L]``. Defaults to ``"latents"``.
            expert_loc: the expert means ``[H, B, A]``. Defaults to ``"expert_loc"``.
            expert_scale: the expert standard deviations ``[H, B, A]``. Defaults to ``"expert_scale"``.
        """

        latents: NestedKey = "latents"
        expert_loc: NestedKey = "expert_loc"
        expert_scale: NestedKey = "expert_scale"

    default_keys = _AcceptedKeys

    def __init__(self, world_model: BMPCWorldModel, *, entropy_coef: float = 1e-4, rho: float = 0.5,
                 scale_tau: float = 0.01):
        if not isinstance(world_model, BMPCWorldModel):
            raise TypeError(f"BMPCPolicyLoss trains BMPC's policy head; got {type(world_model).__name__}.")
        super().__init__(world_model, entropy_coef=entropy_coef, rho=rho, scale_tau=scale_tau)

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        k = self.tensor_keys
        zs = tensordict.get(k.latents).detach()
        loc, scale = tensordict.get(k.expert_loc), tensordict.get(k.expert_scale)
        horizon = loc.shape[0]
        if zs.shape[0] != horizon + 1 or loc.shape != scale.shape or loc.shape[1] != zs.shape[1]:
            raise ValueError(f"BMPCPolicyLoss expects latents [H+1, B, L] and expert loc/scale [H, B, A]; got "
                             f"latents {tuple(zs.shape)}, loc {tuple(loc.shape)}, scale {tuple(scale.shape)}.")
        loc, scale = expert_or_standard_normal(loc, scale)
        mean, log_std = self.world_model.policy_params(zs[:-1])
        kl = normal_kl(mean, log_std.exp(), loc, scale).mean(-1, keepdim=True)  # [H, B, 1]
        self.scale.update(kl[0])
        kl = self.scale(kl)
        entropy, scaled_entropy = gaussian_entropy_terms(log_std, torch.randn_like(mean))
        w = _rho_weights(self.rho, horizon, kl)
        loss = ((kl - self.entropy_coef * scaled_entropy).mean(dim=(1, 2)) * w).mean()
        return TensorDict({
            "loss_pi": loss,
            "pi_kl": kl.detach().mean(),
            "pi_entropy": entropy.detach().mean(),
            "pi_scaled_entropy": scaled_entropy.detach().mean(),
            "pi_scale": self.scale.value.detach().squeeze(),
            "pi_log_std": log_std.detach().mean(),
        }, batch_size=[])
