"""TD-MPC2's MPPI planner in a latent world model."""
from __future__ import annotations

import torch

from torchrl_dreammpc.modules.base import WorldModelBase
from torchrl_dreammpc.planners.base import LatentPlannerBase, _check_float, _check_int

__all__ = ["MPPIPlanner", "tdmpc2_iterations"]

_EVAL_SELECTIONS = ("sample", "best", "mean")

#: TD-MPC2's MPPI iterations (config.yaml ``iterations``) and its rule for large action spaces: the agent's
#: constructor adds 2 when the action has at least 20 dimensions (dog, humanoid, HumanoidBench).
TDMPC2_ITERATIONS = 6
LARGE_ACTION_DIM = 20
LARGE_ACTION_EXTRA_ITERATIONS = 2


def tdmpc2_iterations(action_dim: int, base: int = TDMPC2_ITERATIONS) -> int:
    """TD-MPC2's number of MPPI iterations for an action of ``action_dim`` dimensions: ``base`` (6), plus 2 when
    ``action_dim >= 20`` (``iterations += 2 * (action_dim >= 20)`` in the constructor of TD-MPC2's agent).

    Examples:
        >>> tdmpc2_iterations(6), tdmpc2_iterations(61)
        (6, 8)
    """
    return base + LARGE_ACTION_EXTRA_ITERATIONS * int(action_dim >= LARGE_ACTION_DIM)


class MPPIPlanner(LatentPlannerBase):
    """TD-MPC2's sampling planner (Hansen, Su & Wang, ICLR 2024; ``TDMPC2._plan`` of the public code).

    One control step, from ``z0 = encode(obs)``:

    1. ``num_pi_trajs`` sampled rollouts of the policy prior (kept fixed through the iterations);
    2. a Gaussian over action sequences, mean 0 and std ``max_std``; except at an episode's first step the mean
       is the previous step's final mean shifted by one step (its last step set to 0, as in TD-MPC2);
    3. ``iterations`` times: ``num_samples - num_pi_trajs`` sequences from the Gaussian (clamped to the bounds)
       plus the prior's, scored by ``Σ_t γ^t r + γ^H Q̄(z_H, π(z_H))`` (``Q̄ = value(reduce="avg")``, a fresh
       prior sample at ``z_H`` per iteration, NaN → 0; ``γ^H V̄(z_H)`` in a state-value model, as BMPC's
       ``_estimate_value``); the ``num_elites`` best are weighted by
       ``softmax(temperature · score)`` to refit the mean and std (std clamped to ``[min_std, max_std]``);
    4. action selection, see below; the final mean is kept for the next step.

    Every env of a batch and every sample run as one batch of ``B·num_samples`` rows.

    Action selection. Exploration mode (RANDOM or no mode set): TD-MPC2's — one elite drawn with probability
    equal to its softmax score, its first action plus Gaussian noise with the final std of the first step.
    Evaluation mode (DETERMINISTIC / MODE / MEAN): ``eval_selection`` decides: ``"sample"`` (default, TD-MPC2's
    ``eval_mode``: the same score-weighted elite draw, no noise), ``"best"`` (the highest-scoring elite) or
    ``"mean"`` (the first action of the final MPPI mean).

    Args:
        world_model (WorldModelBase): the latent model to plan in.
        num_samples (int): sequences per iteration, prior ones included (TD-MPC2: 512).
        num_elites (int): elites refitting the Gaussian, ``<= num_samples`` (TD-MPC2: 64).
        iterations (int, optional): MPPI iterations, ``>= 1``. Default ``None``: TD-MPC2's rule,
            :func:`tdmpc2_iterations` (6, or 8 when the action has >= 20 dimensions). An int is used as given.
        num_pi_trajs (int): policy-prior sequences among the samples, ``<= num_samples`` (TD-MPC2: 24).
        horizon (int): H (TD-MPC2: 3).
        temperature (float): score temperature, ``> 0`` (TD-MPC2: 0.5).
        min_std (float): lower std clamp, ``> 0`` (TD-MPC2: 0.05).
        max_std (float): initial std and upper clamp, ``>= min_std`` (TD-MPC2: 2).
        eval_selection (str): ``"sample"``, ``"best"`` or ``"mean"`` (see above). Default ``"sample"``.
        uncertainty_weight (float): optional Dream-MPC-style penalty ``λ Σ_t mean_k(Q_k)·std_k(Q_k)`` on the
            scores (default 0: TD-MPC2, which has none).

    Keyword Args:
        see :class:`~torchrl_dreammpc.planners.LatentPlannerBase`.

    Expert distribution (``expert_key``, BMPC's ``action_dist``): ``loc`` is the selected action before the
    exploration noise (in exploration mode the drawn elite's first action), ``scale`` the final std of the first
    step (within ``[min_std, max_std]``).

    Diagnostics (``diagnostics=True``), each ``[*batch, 1]``: ``("planner", "objective_before")`` (best score of
    the first iteration), ``("planner", "objective_after")`` (score of the executed sequence, last iteration;
    for ``"mean"`` the best elite's), ``("planner", "candidate")`` (its index among the samples of the last
    iteration), ``("planner", "uncertainty")`` (``Σ_t u_t`` of that sequence; one extra ensemble pass).

    Noise layout per env: prior rollouts ``[H, P, A]``, then per iteration the samples ``[H, S-P, A]`` and the
    terminal prior samples ``[S, A]``, then 1 number for the elite draw, then ``[A]`` exploration noise.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl_dreammpc.modules import TDMPC2WorldModel
        >>> wm = TDMPC2WorldModel(5, 1, model_size=1, enc_dim=32, mlp_dim=32, latent_dim=16).eval()
        >>> planner = MPPIPlanner(wm, num_samples=64, num_elites=8, iterations=2, num_pi_trajs=4)
        >>> planner(TensorDict({"observation": torch.randn(5)}))["action"].shape
        torch.Size([1])
    """

    def __init__(
        self,
        world_model: WorldModelBase,
        num_samples: int = 512,
        num_elites: int = 64,
        iterations: int | None = None,
        num_pi_trajs: int = 24,
        horizon: int = 3,
        temperature: float = 0.5,
        min_std: float = 0.05,
        max_std: float = 2.0,
        eval_selection: str = "sample",
        uncertainty_weight: float = 0.0,
        **kwargs,
    ):
        super().__init__(world_model, **kwargs)
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.num_elites = _check_int("num_elites", num_elites, 1)
        if self.num_elites > self.num_samples:
            raise ValueError(f"num_elites ({num_elites}) must be <= num_samples ({num_samples}).")
        if iterations is None:
            iterations = tdmpc2_iterations(self.action_dim)
        self.iterations = _check_int("iterations", iterations, 1)
        self.num_pi_trajs = _check_int("num_pi_trajs", num_pi_trajs, 0)
        if self.num_pi_trajs > self.num_samples:
            raise ValueError(f"num_pi_trajs ({num_pi_trajs}) must be <= num_samples ({num_samples}).")
        self.horizon = _check_int("horizon", horizon, 1)
        self.temperature = _check_float("temperature", temperature, low=0.0, low_open=True)
        self.min_std = _check_float("min_std", min_std, low=0.0, low_open=True)
        self.max_std = _check_float("max_std", max_std, low=self.min_std)
        if eval_selection not in _EVAL_SELECTIONS:
            raise ValueError(f"eval_selection must be one of {_EVAL_SELECTIONS}, got {eval_selection!r}.")
        self.eval_selection = eval_selection
        self.uncertainty_weight = self._check_uncertainty_weight(uncertainty_weight)

    @property
    def noise_per_env(self) -> int:
        S, P, H, A, I = self.num_samples, self.num_pi_trajs, self.horizon, self.action_dim, self.iterations
        return H * P * A + I * (H * (S - P) * A + S * A) + 1 + A

    @property
    def last_plan(self) -> torch.Tensor | None:
        """The final MPPI mean of the last step, ``[B, H, A]`` (before shifting)."""
        return None if self._prev is None else self._prev.transpose(0, 1)

    def plan(self, z0: torch.Tensor, warm: torch.Tensor | None, explore: bool):
        B, L = z0.shape
        S, E, P, H, A = self.num_samples, self.num_elites, self.num_pi_trajs, self.horizon, self.action_dim
        R = S - P  # sampled (non-prior) sequences
        M = B * S
        lam = self.uncertainty_weight
        noise = self.draw_noise(B, z0.device, z0.dtype)
        offset = H * P * A
        per_iter = H * R * A + S * A

        with torch.no_grad():
            # 1. prior sequences [H, B, P, A].
            pi_actions = None
            if P > 0:
                eps = noise[:, :offset].view(B, H, P, A).transpose(0, 1).reshape(H, B * P, A)
                pi_actions = self.rollout_prior(z0, eps).view(H, B, P, A)
            # 2. the Gaussian, warm-started from the shifted previous mean (last step 0, as TD-MPC2).
            mean = z0.new_zeros(H, B, A)
            if warm is not None:
                shifted = torch.cat([self._prev[1:], torch.zeros_like(self._prev[:1])])
                mean = shifted * warm.view(1, B, 1)
            std = torch.full_like(mean, self.max_std)
            low, high = self.action_low.view(1, 1, 1, A), self.action_high.view(1, 1, 1, A)

            # 3. MPPI iterations.
            first_best = None
            for i in range(self.iterations):
                it_noise = noise[:, offset + i * per_iter: offset + (i + 1) * per_iter]
                r = it_noise[:, :H * R * A].view(B, H, R, A).transpose(0, 1)
                eps_H = it_noise[:, H * R * A:].reshape(M, A)
                sampled = torch.clamp(mean.unsqueeze(2) + std.unsqueeze(2) * r, low, high)  # [H, B, R, A]
                actions = torch.cat([pi_actions, sampled], dim=2) if P > 0 else sampled  # [H, B, S, A]
                ret, unc = self.imagine(z0, actions.view(H, M, A), eps_H, uncertainty=lam > 0)
                raw = (ret if unc is None else ret - lam * unc).view(B, S)
                value = raw.nan_to_num(0.0)  # TD-MPC2: a NaN score counts as 0
                elite_value, elite_idx = value.topk(E, dim=1)  # sorted, best first
                elite_actions = actions.gather(2, elite_idx.view(1, B, E, 1).expand(H, B, E, A))  # [H, B, E, A]
                score = torch.softmax(self.temperature * elite_value, dim=1)  # [B, E]
                w = score.view(1, B, E, 1)
                mean = (w * elite_actions).sum(2)
                std = (w * (elite_actions - mean.unsqueeze(2)).square()).sum(2).sqrt().clamp(self.min_std, self.max_std)
                if i == 0:
                    first_best = elite_value[:, :1]

            # 4. action selection.
            if explore or self.eval_selection == "sample":
                # Categorical draw over the elites by score, by inverse CDF of one uniform per env (Φ of a normal,
                # so that all the noise of the step stays one env-major normal draw).
                u = torch.special.ndtr(noise[:, -A - 1:-A])  # [B, 1]
                cdf = score.cumsum(1)
                k = (cdf < u * cdf[:, -1:]).sum(1, keepdim=True).clamp(max=E - 1)  # [B, 1]
            else:
                k = torch.zeros(B, 1, dtype=torch.long, device=z0.device)  # best elite (topk is sorted)
            # The executed sequence's raw score, for the base class's finiteness check (NaN: the model's fault).
            self._objective = raw.gather(1, elite_idx.gather(1, k))
            if not explore and self.eval_selection == "mean":
                action = mean[0]
            else:
                action = elite_actions[0].gather(1, k.unsqueeze(-1).expand(B, 1, A)).squeeze(1)
            diag = {}
            if self.expert_key is not None:
                diag = {"expert_loc": action, "expert_scale": std[0]}
            if explore:
                action = action + std[0] * noise[:, -A:]
            action = self.clamp_action(action)
            self._prev = mean  # [H, B, A]

            if self.diagnostics:
                seq = elite_actions.gather(2, k.view(1, B, 1, 1).expand(H, B, 1, A)).squeeze(2)  # [H, B, A]
                _, seq_unc = self.imagine(z0, seq, None, uncertainty=True)
                diag.update({"objective_before": first_best, "objective_after": elite_value.gather(1, k),
                             "candidate": elite_idx.gather(1, k), "uncertainty": seq_unc})
        return action, diag

    def extra_repr(self) -> str:
        return (f"num_samples={self.num_samples}, num_elites={self.num_elites}, iterations={self.iterations}, "
                f"num_pi_trajs={self.num_pi_trajs}, horizon={self.horizon}, temperature={self.temperature}, "
                f"min_std={self.min_std}, max_std={self.max_std}, eval_selection={self.eval_selection!r}, "
                + super().extra_repr())
