"""Dream-MPC: gradient-based MPC from policy-prior candidates in a latent world model."""
from __future__ import annotations

import torch

from torchrl_dreammpc.modules.base import WorldModelBase
from torchrl_dreammpc.planners.base import LatentPlannerBase, _check_bool, _check_float, _check_int

__all__ = ["GradientMPCPlanner", "UNCERTAINTY_WEIGHT_BY_FAMILY"]

#: Dream-MPC's uncertainty weight λ by the family of the model it plans in (``uncertainty_weight=None``)
#: [Dream-MPC]: 0.01 with TD-MPC2's world models, 0.1 with BMPC's ("Dream-MPC with a strong policy"). Other families
#: (DreamerV3: no published value) take TD-MPC2's.
UNCERTAINTY_WEIGHT_BY_FAMILY: dict[str, float] = {"tdmpc2": 0.01, "bmpc": 0.1}


class GradientMPCPlanner(LatentPlannerBase):
    """Dream-MPC (Spieler & Behnke, arXiv:2605.04568): a few policy-prior rollouts refined by gradient ascent.

    One control step, from ``z0 = encode(obs)``:

    1. roll the policy prior out in the model: ``num_candidates`` sampled action sequences of length ``horizon``;
    2. warm start (every step but an episode's first): ``a ← ρ·shift(a_prev) + (1-ρ)·a_π``, where ``a_prev`` is
       the same candidate's optimized sequence of the previous step and ``shift`` drops its first action and
       repeats its last;
    3. ``iterations`` steps of plain gradient ascent, all candidates (and envs) in one batch, on
       ``J = Σ_t γ^t r(z_t, a_t) + γ^H Q̄(z_H, π(z_H)) − λ Σ_{t=0..H} u_t`` with
       ``u = mean_k(Q_k)·std_k(Q_k)`` over the Q ensemble (``Q̄``: ``value(reduce="avg")``, γ:
       ``world_model.discount``; in a state-value model such as BMPC's, ``γ^H V̄(z_H)`` and ``u_t`` over its
       V ensemble at ``z_t``: see :meth:`~LatentPlannerBase.imagine`); the gradient of each candidate is
       norm-clipped to ``max_grad_norm``; actions are clamped to the bounds after each step. Only the actions are
       differentiated (``torch.autograd.grad``): no gradient reaches the model parameters;
    4. ``J`` is re-evaluated; the first action of the best candidate is executed and all candidates are kept
       for the next step's warm start.

    ``π(z_H)`` is a sample of the prior whose noise is drawn once per control step, so ``J`` is a deterministic
    function of the actions within a step (the gradient steps and the final ranking see the same objective).

    Modes (TorchRL's ``set_exploration_type``): candidates are *sampled* from the prior in every mode (that is
    the published method, exploration comes from there). In exploration mode (RANDOM, or no mode set) Gaussian
    noise of std ``exploration_std`` (default 0: none) is added to the executed action; in DETERMINISTIC / MODE /
    MEAN it never is.

    Args:
        world_model (WorldModelBase): the latent model to plan in.
        num_candidates (int): N, candidate sequences (Dream-MPC: 5).
        horizon (int): H (Dream-MPC with TD-MPC2 models: 3).
        iterations (int): gradient steps per control step (Dream-MPC: 1). ``0`` is allowed: the warm-started
            prior candidates are only ranked by ``J`` (a "policy + amortization + selection" ablation).
        lr (float): SGD step size (Dream-MPC: 0.1).
        warm_start_weight (float): ρ in [0, 1] (Dream-MPC: 0.1); 0 disables the warm start.
        uncertainty_weight (float or None): λ >= 0; 0 disables the penalty. ``None`` (default): Dream-MPC's
            published value for the model's family, :data:`UNCERTAINTY_WEIGHT_BY_FAMILY` (0.01 with TD-MPC2's
            models, 0.1 with BMPC's; 0.01 for other families).
        max_grad_norm (float or None): per-candidate gradient-norm clip (Dream-MPC: 20); ``None``: no clipping.
        uncertainty_grad (bool): if ``False`` (default, the authors' code), the penalty only *ranks* the candidates
            in step 4 and the gradient steps ascend the return alone (cheaper: two Q heads on the last latent
            instead of every head on every step); if ``True`` the gradient of the penalty is followed too.
        exploration_std (float): std of the Gaussian noise on the executed action in exploration mode. Default 0.

    Keyword Args:
        see :class:`~torchrl_dreammpc.planners.LatentPlannerBase` (``action_spec``/``low``/``high``, keys,
        ``diagnostics``, ``generator``, ``check_finite``).

    Expert distribution (``expert_key``; the "expert" a BMPC-trained policy imitates): ``loc`` is the executed
    action before the exploration noise (the best candidate's first action after the gradient steps), ``scale`` the
    policy prior's std at the current state, clamped to :attr:`expert_std_bounds` (MPPI's ``[min_std, max_std]``).
    Dream-MPC improves the prior's mean by gradient ascent and selection, but its few candidates (5, drawn from
    the prior and moved by one small step) carry no estimate of a posterior spread: the sample std of 5 draws is
    ~16 % below the prior's on average, so imitating it would shrink the policy's std for no reason. The expert
    therefore keeps the prior's own std, and the std is left to what imitation of a real planner distribution
    (BMPC's MPPI reanalyze) and the entropy term teach.

    Diagnostics (``diagnostics=True``), each ``[*batch, 1]``: ``("planner", "objective_before")`` and
    ``("planner", "objective_after")`` (J of the executed candidate before the first and after the last gradient
    step), ``("planner", "candidate")`` (its index), ``("planner", "uncertainty")`` (its ``Σ_t u_t``).

    Noise layout per env (``noise_per_env = H·N·A + N·A + A``): prior rollout ``[H, N, A]``, terminal prior
    sample ``[N, A]``, exploration ``[A]``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl_dreammpc.modules import TDMPC2WorldModel
        >>> wm = TDMPC2WorldModel(5, 1, model_size=1, enc_dim=32, mlp_dim=32, latent_dim=16).eval()
        >>> planner = GradientMPCPlanner(wm, num_candidates=5, horizon=3, iterations=1, lr=0.1)
        >>> td = planner(TensorDict({"observation": torch.randn(8, 5), "is_init": torch.ones(8, 1, dtype=torch.bool)}, [8]))
        >>> td["action"].shape, planner.last_plan.shape
        (torch.Size([8, 1]), torch.Size([8, 5, 3, 1]))
    """

    #: bounds of the expert std (BMPC clamps its MPPI std to [min_std, max_std] = [0.05, 2]).
    expert_std_bounds = (0.05, 2.0)

    def __init__(
        self,
        world_model: WorldModelBase,
        num_candidates: int = 5,
        horizon: int = 3,
        iterations: int = 1,
        lr: float = 0.1,
        warm_start_weight: float = 0.1,
        uncertainty_weight: float | None = None,
        max_grad_norm: float | None = 20.0,
        uncertainty_grad: bool = False,
        exploration_std: float = 0.0,
        **kwargs,
    ):
        super().__init__(world_model, **kwargs)
        self.num_candidates = _check_int("num_candidates", num_candidates, 1)
        self.horizon = _check_int("horizon", horizon, 1)
        self.iterations = _check_int("iterations", iterations, 0)
        self.lr = _check_float("lr", lr, low=0.0, low_open=True)
        self.warm_start_weight = _check_float("warm_start_weight", warm_start_weight, low=0.0, high=1.0)
        if uncertainty_weight is None:
            family = getattr(world_model, "family", None)
            uncertainty_weight = UNCERTAINTY_WEIGHT_BY_FAMILY.get(family, UNCERTAINTY_WEIGHT_BY_FAMILY["tdmpc2"])
        self.uncertainty_weight = self._check_uncertainty_weight(uncertainty_weight)
        self.max_grad_norm = (None if max_grad_norm is None
                              else _check_float("max_grad_norm", max_grad_norm, low=0.0, low_open=True))
        self.uncertainty_grad = _check_bool("uncertainty_grad", uncertainty_grad)
        self.exploration_std = _check_float("exploration_std", exploration_std, low=0.0)

    @property
    def noise_per_env(self) -> int:
        N, H, A = self.num_candidates, self.horizon, self.action_dim
        return H * N * A + N * A + A

    @property
    def last_plan(self) -> torch.Tensor | None:
        """The optimized candidates of the last step, ``[B, N, H, A]`` (before shifting)."""
        return None if self._prev is None else self._prev.permute(1, 2, 0, 3)

    def plan(self, z0: torch.Tensor, warm: torch.Tensor | None, explore: bool):
        B, L = z0.shape
        N, H, A = self.num_candidates, self.horizon, self.action_dim
        M = B * N  # candidates of all envs in one batch, env-major: row b*N + n
        lam = self.uncertainty_weight
        noise = self.draw_noise(B, z0.device, z0.dtype)
        n_roll = H * N * A
        eps_roll = noise[:, :n_roll].view(B, H, N, A).transpose(0, 1).reshape(H, M, A)
        eps_H = noise[:, n_roll:n_roll + N * A].reshape(M, A)

        with torch.no_grad():
            # 1. candidates: sampled rollouts of the policy prior (TD-MPC2 style: H prior calls, H-1 model steps).
            a = self.rollout_prior(z0, eps_roll)  # [H, M, A]
            # 2. amortization: blend with the shifted previous solution where the env continues its episode.
            if warm is not None and self.warm_start_weight > 0:
                prev = self._prev  # [H, B, N, A]
                shifted = torch.cat([prev[1:], prev[-1:]])
                w = (self.warm_start_weight * warm).view(1, B, 1, 1)
                a = torch.lerp(a.view(H, B, N, A), shifted, w).view(H, M, A)
            a = self.clamp_action(a)

        # 3. gradient ascent on J w.r.t. the actions only.
        J_before = None
        for i in range(self.iterations):
            # The penalty enters the gradient pass only if it is followed, or to report J before optimizing.
            with_unc = lam > 0 and (self.uncertainty_grad or (self.diagnostics and i == 0))
            with torch.enable_grad():
                a_var = a.detach().requires_grad_(True)
                ret, unc = self.imagine(z0, a_var, eps_H, uncertainty=with_unc)
                objective = torch.sub(ret, unc, alpha=lam) if (unc is not None and self.uncertainty_grad) else ret
                (grad,) = torch.autograd.grad(objective.sum(), a_var)
            with torch.no_grad():
                if i == 0 and self.diagnostics:
                    J_before = torch.sub(ret, unc, alpha=lam) if unc is not None else ret
                if self.max_grad_norm is not None:
                    # Per-candidate clip: rows are independent, so each candidate's gradient is its own.
                    norm = torch.linalg.vector_norm(grad, dim=(0, 2), keepdim=True)  # [1, M, 1]
                    scale = torch.clamp_max(self.max_grad_norm / (norm + 1e-6), 1.0)
                    a = self.clamp_action(torch.addcmul(a, grad, scale, value=self.lr))
                else:
                    a = self.clamp_action(torch.add(a, grad, alpha=self.lr))

        # 4. re-evaluate, execute the best candidate's first action, keep every candidate.
        with torch.no_grad():
            ret, unc = self.imagine(z0, a, eps_H, uncertainty=lam > 0 or self.diagnostics)
            J = torch.sub(ret, unc, alpha=lam) if lam > 0 else ret
            J = J.view(B, N).nan_to_num(nan=float("-inf"))
            idx = J.argmax(1, keepdim=True)  # [B, 1]
            self._objective = J.gather(1, idx)  # -inf where every candidate's J was NaN: the check refuses it
            a4 = a.view(H, B, N, A)
            action = expert_loc = a4[0].gather(1, idx.unsqueeze(-1).expand(B, 1, A)).squeeze(1)
            if explore and self.exploration_std > 0:
                action = self.clamp_action(action + self.exploration_std * noise[:, -A:])
            self._prev = a4
            diag = {}
            if self.expert_key is not None:
                log_std = self._ops().policy(z0, deterministic=True)[2]
                diag = {"expert_loc": expert_loc, "expert_scale": log_std.exp().clamp(*self.expert_std_bounds)}
            if self.diagnostics:
                J_before = J if J_before is None else J_before.view(B, N)
                diag.update({"objective_before": J_before.gather(1, idx), "objective_after": J.gather(1, idx),
                             "candidate": idx, "uncertainty": unc.view(B, N).gather(1, idx)})
        return action, diag

    def extra_repr(self) -> str:
        return (f"num_candidates={self.num_candidates}, horizon={self.horizon}, iterations={self.iterations}, "
                f"lr={self.lr}, warm_start_weight={self.warm_start_weight}, "
                f"uncertainty_weight={self.uncertainty_weight}, max_grad_norm={self.max_grad_norm}, "
                f"uncertainty_grad={self.uncertainty_grad}, " + super().extra_repr())
