"""Generates ``tdmpc2_mppi_reference.pt``: TD-MPC2's MPPI (its public code) over several warm-started control steps,
on fixed weights, fixed observations and pinned randomness.

TD-MPC2 (Hansen, Su & Wang, ICLR 2024; github.com/nicklashansen/tdmpc2, MIT, commit e9f5932) is run on the CPU by
``../shared/peers/tdmpc2_peer.py``. ``tests/test_tdmpc2_mppi_reference.py`` replays the same steps with ``MPPIPlanner``
and compares the actions and the final MPPI means; nothing of the peer is imported by the library.

What is run, per case (a tiny model, observation 6, action 2; ``q5``: 5 Q heads, so that the random pair of
``Q(..., return_type="avg")`` matters; ``episodic_q3``: 3 Q heads and a termination head), per mode (``explore``:
``act(..., eval_mode=False)``, its exploration noise included; ``eval``: ``eval_mode=True``):

- the weights are the peer's initialization perturbed with a fixed seed (no head trivially zero); the termination
  head's bias is shifted so that about half of the imagined states terminate;
- everything in float64 (``torch.set_default_dtype``): in float32 the two implementations' rounding differs by
  ~1e-5 in the scores, which after a few iterations swaps elites at the top-k boundary, and the comparison would
  only hold in distribution; in float64 it holds step by step;
- 2 envs, 6 steps: env ``b`` at step ``t`` calls ``agent.act(obs[t, b], t0=...)`` with the agent's ``_prev_mean``
  set to that env's previous final mean; ``t0`` is True at step 0 and where an env starts a new episode
  (``RESETS``), so both the warm start (the previous mean shifted by one step) and its reset are exercised;
- the peer's ``torch.randn`` / ``randn_like`` draws are the parts of ``noise[t, b]`` that ``MPPIPlanner`` uses for
  the same purpose, its Gumbel elite draw the inverse-CDF draw from the same noise, and ``torch.randperm`` (the
  Q-head pair) returns ``perms[t, i]`` at iteration ``i`` — the same pair for both envs, as ``MPPIPlanner`` draws
  one pair per iteration for its whole batch (see ``peer_noise.py``).

Saved: per case the peer's ``state_dict`` and ``config``, and per mode ``observation [T, B, O]``, ``is_init
[T, B, 1]``, ``noise [T, B, D]``, ``perms [T, I, num_q]``, the actions ``[T, B, A]`` and the final means
``[T, B, H, A]`` (``_prev_mean`` after each step). The weights, observations and noise are float32 numbers (saved
as float32 without loss; the peer runs on them in float64), the actions and means float64.

    python tests/data/tdmpc2_mppi_reference.py                  # writes tests/data/tdmpc2_mppi_reference.pt
    python tests/data/tdmpc2_mppi_reference.py --out /tmp/ref.pt
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peer_noise import mppi_draws, mppi_noise_size, pinned_randomness  # noqa: E402

PEER = HERE.parents[2] / "shared" / "peers" / "tdmpc2_peer.py"
OUT = HERE / "tdmpc2_mppi_reference.pt"

OBS_DIM, ACTION_DIM, ENVS, STEPS, EPISODE_LENGTH = 6, 2, 2, 6, 500
MODEL = dict(enc_dim=32, mlp_dim=32, latent_dim=16, num_enc_layers=2, simnorm_dim=8, num_bins=101, vmin=-10.0,
             vmax=10.0, dropout=0.0)
CASES = {"q5": dict(num_q=5, episodic=False), "episodic_q3": dict(num_q=3, episodic=True)}
PLAN = dict(num_samples=64, num_elites=8, num_pi_trajs=8, iterations=3, horizon=3, temperature=0.5, min_std=0.05,
            max_std=2.0)
MODES = {"explore": False, "eval": True}  # mode -> the peer's eval_mode
RESETS = {(1, 3)}  # (env, step) where a new episode starts (t0=True) besides step 0
SEED = 0


def load_peer():
    spec = importlib.util.spec_from_file_location("tdmpc2_peer", PEER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def default_dtype(dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if t.is_floating_point() and not t.is_meta and t.numel() > 1 and "log_std" not in name:
                t.add_(0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype))
                t.copy_(t.float())  # float32-representable: saved as float32 without loss


def center_termination(model, seed: int) -> None:
    """Shift the termination head's output bias so that about half of the imagined states terminate (perturbed,
    every state did: the objective would then stop after the first step, leaving the rest of it untested)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = model.encode(torch.randn(64, OBS_DIM, generator=g), None)
        logits = []
        for _ in range(PLAN["horizon"]):
            z = model.next(z, torch.rand(64, ACTION_DIM, generator=g) * 2 - 1, None)
            logits.append(model.termination(z, None, unnormalized=True))
        model._termination[-1].bias.sub_(torch.cat(logits).median())
        model._termination[-1].bias.copy_(model._termination[-1].bias.float())


def is_init_flags() -> torch.Tensor:
    flags = torch.zeros(STEPS, ENVS, 1, dtype=torch.bool)
    flags[0] = True
    for b, t in RESETS:
        flags[t, b] = True
    return flags


def run_mode(agent, peer_math, num_q: int, eval_mode: bool, seed: int) -> dict:
    sizes = dict(num_samples=PLAN["num_samples"], num_pi_trajs=PLAN["num_pi_trajs"], iterations=PLAN["iterations"],
                 horizon=PLAN["horizon"], action_dim=ACTION_DIM)
    g = torch.Generator().manual_seed(seed)
    # float32 numbers (saved as such without loss), used in float64
    obs = torch.randn(STEPS, ENVS, OBS_DIM, generator=g, dtype=torch.float32).double()
    noise = torch.randn(STEPS, ENVS, mppi_noise_size(**sizes), generator=g, dtype=torch.float32).double()
    perms = torch.stack([torch.stack([torch.randperm(num_q, generator=g) for _ in range(PLAN["iterations"])])
                         for _ in range(STEPS)])
    flags = is_init_flags()
    actions = torch.empty(STEPS, ENVS, ACTION_DIM)
    means = torch.empty(STEPS, ENVS, PLAN["horizon"], ACTION_DIM)
    prev = torch.zeros(ENVS, PLAN["horizon"], ACTION_DIM)
    for t in range(STEPS):
        for b in range(ENVS):
            agent._prev_mean.copy_(prev[b])
            draws = mppi_draws(noise[t, b:b + 1], **sizes, terminal_prior=True, batched=False)
            with pinned_randomness(peer_math, draws, noise[t, b:b + 1], ACTION_DIM, list(perms[t])) as (feeder,
                                                                                                      randperm):
                actions[t, b] = agent.act(obs[t, b], t0=bool(flags[t, b]), eval_mode=eval_mode)
            assert len(feeder.draws) == int(eval_mode), "the peer did not draw what the layout plans"
            assert not randperm.perms, "the peer did not draw one Q pair per iteration"
            prev[b] = agent._prev_mean
            means[t, b] = agent._prev_mean
    return dict(observation=obs.float(), is_init=flags, noise=noise.float(), perms=perms, action=actions, mean=means)


def float32_state_dict(model) -> dict:
    """The model's tensors as float32; entries that share storage in the model (TD-MPC2's ``_detach_Qs`` are its
    ``_Qs``) share it in the file too, which keeps the file small."""
    converted, out = {}, {}
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor) and not v.is_meta:
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
            out[k] = converted.setdefault(key, v.detach().float())
    return out


def generate_case(peer, name: str) -> dict:
    case = CASES[name]
    torch.manual_seed(SEED)  # the peer initializes its weights from the global RNG
    agent = peer.make_agent(1, OBS_DIM, ACTION_DIM, episode_length=EPISODE_LENGTH, **MODEL, **case, **PLAN)
    assert agent.cfg.iterations == PLAN["iterations"]
    from common import math as peer_math  # imported by make_agent

    perturb(agent.model, SEED + 100 + len(name))
    if case["episodic"]:
        center_termination(agent.model, SEED + 200)
    agent.model.eval()
    out = {"config": dict(MODEL, **case, **PLAN, obs_dim=OBS_DIM, action_dim=ACTION_DIM,
                          episode_length=EPISODE_LENGTH, discount=float(agent.discount))}
    for i, (mode, eval_mode) in enumerate(MODES.items()):
        out[mode] = run_mode(agent, peer_math, case["num_q"], eval_mode, seed=SEED + 10 * i + len(name))
    out["state_dict"] = float32_state_dict(agent.model)
    return out


def generate() -> dict:
    peer = load_peer()
    with default_dtype(torch.float64), torch.no_grad():
        cases = {name: generate_case(peer, name) for name in CASES}
    return {"source": "github.com/nicklashansen/tdmpc2@e9f5932 (MIT), tests/data/tdmpc2_mppi_reference.py",
            "torch": str(torch.__version__), **cases}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    reference = generate()
    torch.save(reference, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")
