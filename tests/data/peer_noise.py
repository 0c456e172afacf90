"""Pinning a peer planner's randomness to the numbers ``MPPIPlanner`` consumes (for the reference generators).

``MPPIPlanner`` takes all the noise of a control step as one standard-normal tensor ``[B, D]`` laid out per env
(see its docstring): the prior rollouts ``[H, P, A]``; per iteration the samples ``[H, S-P, A]`` and the terminal
prior samples ``[S, A]``; one number for the elite draw; ``[A]`` exploration noise. TD-MPC2's and BMPC's
``_plan`` draw the same things with ``torch.randn`` / ``randn_like`` calls in that order (BMPC's state-value
objective draws no terminal prior sample), pick the elite with a Gumbel trick, and draw a random pair of Q heads
with ``torch.randperm``. The helpers below stand in for those calls so that a peer and ``MPPIPlanner`` consume
identical randomness; the Gumbel draw becomes the inverse-CDF draw ``MPPIPlanner`` makes from the same uniform
(the same categorical distribution over the elites, sampled from the same number).
"""
from __future__ import annotations

import contextlib

import torch


def mppi_noise_size(*, num_samples: int, num_pi_trajs: int, iterations: int, horizon: int, action_dim: int) -> int:
    """``MPPIPlanner.noise_per_env`` for these sizes."""
    S, P, I, H, A = num_samples, num_pi_trajs, iterations, horizon, action_dim
    return H * P * A + I * (H * (S - P) * A + S * A) + 1 + A


def mppi_draws(noise: torch.Tensor, *, num_samples: int, num_pi_trajs: int, iterations: int, horizon: int,
               action_dim: int, terminal_prior: bool, batched: bool) -> list[torch.Tensor]:
    """The peer's ``randn`` draws of one plan, in its call order, cut from ``noise [B, D]``.

    ``batched``: the peer plans the ``B`` rows together (BMPC's reanalyze; draws keep a leading ``B``); otherwise
    ``B`` must be 1 and the draws are a single env's (TD-MPC2's ``act``). ``terminal_prior``: the objective
    samples ``π(z_H)`` once per iteration (a state-action value model). The last draw is the exploration noise
    ``[A]`` (of row 0), which the peer draws only outside its evaluation mode.
    """
    S, P, I, H, A = num_samples, num_pi_trajs, iterations, horizon, action_dim
    B, D = noise.shape
    if D != mppi_noise_size(num_samples=S, num_pi_trajs=P, iterations=I, horizon=H, action_dim=A):
        raise ValueError(f"noise has {D} numbers per env, the layout needs "
                         f"{mppi_noise_size(num_samples=S, num_pi_trajs=P, iterations=I, horizon=H, action_dim=A)}")
    if not batched and B != 1:
        raise ValueError(f"an unbatched peer plans one env; noise has {B} rows")
    prior, per_iter = H * P * A, H * (S - P) * A + S * A
    draws = [noise[:, :prior].view(B, H, P, A)[:, t] for t in range(H)]  # pi(z_t): randn_like(mean [B, P, A])
    for i in range(I):
        it = noise[:, prior + i * per_iter: prior + (i + 1) * per_iter]
        draws.append(it[:, :H * (S - P) * A].reshape(B, H, S - P, A))  # the Gaussian's samples
        if terminal_prior:
            draws.append(it[:, H * (S - P) * A:].reshape(B, S, A))  # pi(z_H) in the objective
    if not batched:
        draws = [d.squeeze(0) for d in draws]
    draws.append(noise[0, -A:].clone())  # the exploration noise randn(A)
    return draws


class NoiseFeeder:
    """Stands in for ``torch.randn`` / ``torch.randn_like``: hands out ``draws`` in order, checking every shape."""

    def __init__(self, draws: list[torch.Tensor]):
        self.draws = list(draws)

    def randn(self, *shape, **kwargs):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        if not self.draws:
            raise AssertionError(f"the peer drew randn{shape} beyond the planned noise")
        out = self.draws.pop(0)
        assert tuple(out.shape) == tuple(shape), (tuple(out.shape), shape)
        return out.clone()

    def randn_like(self, x, **kwargs):
        return self.randn(*x.shape)


class ScriptedRandperm:
    """Stands in for ``torch.randperm``: hands out the given permutations in order (the random Q-head pairs)."""

    def __init__(self, perms: list[torch.Tensor]):
        self.perms = list(perms)

    def __call__(self, n, *args, **kwargs):
        if not self.perms:
            raise AssertionError(f"randperm({n}) called beyond the scripted permutations")
        perm = self.perms.pop(0)
        assert perm.numel() == n, (perm.numel(), n)
        return perm.clone()


def inverse_cdf_choice(noise: torch.Tensor, A: int):
    """``MPPIPlanner``'s elite draw in place of the peer's ``gumbel_softmax_sample(p, ...)``: one uniform per env,
    ``Φ(noise[:, -A-1])``, through the CDF of the scores ``p`` (``[B, E]``, or ``[E]`` for one env)."""
    def choose(p, temperature=1.0, dim=0):
        rows = p if p.dim() == 2 else p.unsqueeze(0)
        u = torch.special.ndtr(noise[:, -A - 1:-A]).to(rows.dtype)
        cdf = rows.cumsum(1)
        k = (cdf < u * cdf[:, -1:]).sum(1).clamp(max=rows.shape[1] - 1)
        return k if p.dim() == 2 else k[0]
    return choose


@contextlib.contextmanager
def pinned_randomness(peer_math, draws: list[torch.Tensor], noise: torch.Tensor, action_dim: int,
                      perms: list[torch.Tensor] | None = None):
    """Within the block, the peer's ``torch.randn`` / ``randn_like`` return ``draws``, its
    ``peer_math.gumbel_softmax_sample`` is the inverse-CDF draw from ``noise`` and, with ``perms``,
    ``torch.randperm`` returns those. Yields ``(feeder, randperm)`` to check what was left unconsumed."""
    feeder = NoiseFeeder(draws)
    randperm = ScriptedRandperm(perms or [])
    saved = torch.randn, torch.randn_like, torch.randperm, peer_math.gumbel_softmax_sample
    torch.randn, torch.randn_like = feeder.randn, feeder.randn_like
    peer_math.gumbel_softmax_sample = inverse_cdf_choice(noise, action_dim)
    if perms is not None:
        torch.randperm = randperm
    try:
        yield feeder, randperm
    finally:
        torch.randn, torch.randn_like, torch.randperm, peer_math.gumbel_softmax_sample = saved
