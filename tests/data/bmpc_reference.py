"""Generates ``bmpc_reference.pt``: BMPC's public code run on fixed weights and a fixed batch.

BMPC (Wang et al., ICLR 2025; github.com/wertyuilife2/bmpc, MIT, commit d5dabc6) is read from
``../shared/peers/bmpc-d5dabc6.tar.gz`` (or ``--archive``), unpacked into a temporary folder, its hard-coded
``cuda:0`` patched to the CPU (as ``../shared/peers/tdmpc2_peer.py`` does for TD-MPC2), and its agent built with a
small architecture (observation 6, action 2, latent 16, MLPs 32 wide, 2 V heads). Nothing of it is imported by
the library: ``tests/test_bmpc_reference.py`` compares ``torchrl_dreammpc``'s BMPC pieces against the saved
outputs to 1e-5.

Saved (CPU tensors, a few hundred kB):

- ``state_dict``: the peer's ``WorldModel.state_dict()`` (weights perturbed from their initialization with a fixed
  seed so that no head is trivially zero; the target V heads perturbed again so that they differ from the online
  ones), and ``config``: the sizes and constants it was built with;
- ``model``: world-model outputs in eval mode on ``obs`` / ``action`` ``[7, ...]``: the latent, next latent,
  reward logits and decoded reward, every V head's logits and values, the target V's, the policy's ``tanh`` mean
  and log-std (acting and exploration ranges) and its action for a given ``eps``;
- ``update``: a ``[H+1, B]`` batch (``obs``, ``action``, ``reward``, the expert distribution with NaN holes), the
  model-based value targets ``_td_target_V`` (``torch.manual_seed(seed_target)`` before the call), the losses of
  one ``_update`` with ``pretrain=True`` (same seed; the V dropout is 0 so that train mode is deterministic), its
  world-model gradient norm, and the policy's KL loss of ``update_pi`` on the rollout latents of that update
  (``torch.manual_seed(seed_pi)``): loss, running scale, gradient norm;
- ``reanalyze``: one lazy-reanalyze plan (``_plan(..., t0=True, reanalyze=True, update_prev_mean=False)``) of
  6 observations with 64 samples, 8 elites, 8 policy trajectories, 3 iterations, its expert distribution
  ``action_dist`` (the chosen elite's first action, the final std) and the planner noise it consumed: BMPC's
  ``torch.randn`` / ``randn_like`` draws are replaced, in call order, by slices of one ``[6, D]`` standard-normal
  tensor laid out as ``MPPIPlanner`` lays out its noise, and its Gumbel elite draw by the inverse-CDF draw
  ``MPPIPlanner`` makes from the same tensor (the same categorical distribution over the elites, sampled from the
  same numbers), so that the two implementations consume identical randomness;
- ``acting``: BMPC's own acting MPPI (``_plan(obs, 1, t0=(t == 0), eval_mode=False)``: the acting prior, the
  previous final mean shifted by one step, the exploration noise) over 5 steps of one env on fixed observations,
  with the same pinned randomness: per step the action, the expert distribution ``action_dist`` and the final
  mean ``_prev_mean``.

    python tests/data/bmpc_reference.py                     # writes tests/data/bmpc_reference.pt
    python tests/data/bmpc_reference.py --out /tmp/ref.pt
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peer_noise import mppi_draws, mppi_noise_size, pinned_randomness  # noqa: E402

ARCHIVE = HERE.parents[2] / "shared" / "peers" / "bmpc-d5dabc6.tar.gz"
OUT = HERE / "bmpc_reference.pt"

CONFIG = dict(obs_dim=6, action_dim=2, enc_dim=32, mlp_dim=32, latent_dim=16, num_enc_layers=2, num_q=2,
              num_bins=101, vmin=-10.0, vmax=10.0, simnorm_dim=8, log_std_min=-3.0, log_std_max=1.0,
              expl_log_std_min=-2.0, expl_log_std_max=1.0, episode_length=500, horizon=3, batch_size=16)
PLAN = dict(num_samples=64, num_elites=8, num_pi_trajs=8, iterations=3, temperature=0.5, min_std=0.05, max_std=2.0)
SEEDS = dict(weights=0, batch=1, target=2, pi=3, noise=4, acting=5)
REANALYZE_STATES = 6
ACTING_STEPS = 5


def unpack(archive: Path) -> Path:
    """The peer's ``bmpc/`` folder in a temporary directory, patched for the CPU."""
    dst = Path(tempfile.mkdtemp(prefix="bmpc_peer_"))
    with tarfile.open(archive) as tar:
        tar.extractall(dst, filter="data")
    root = dst / "bmpc"
    for f in root.rglob("*.py"):
        s = f.read_text()
        s = s.replace("torch.device('cuda:0')", "torch.device('cpu')").replace("capturable=True", "capturable=False")
        # The model is built on the CPU already; .to() trips over its meta-device ensemble template.
        s = s.replace("WorldModel(cfg).to(self.device)", "WorldModel(cfg)")
        f.write_text(s)
    return root


def peer_config() -> types.SimpleNamespace:
    c = CONFIG
    cfg = dict(
        task="peer", obs="state", obs_shape={"state": (c["obs_dim"],)}, action_dim=c["action_dim"],
        episode_length=c["episode_length"], multitask=False, task_dim=0, compile=False, mpc=True, bmpc=True,
        use_v_instead_q=True, td_horizon=1, reanalyze_interval=10, reanalyze_batch_size=REANALYZE_STATES // 3,
        reanalyze_horizon=c["horizon"], batch_size=c["batch_size"], horizon=c["horizon"], reward_coef=0.1,
        value_coef=0.1, consistency_coef=20.0, rho=0.5, lr=3e-4, enc_lr_scale=0.3, grad_clip_norm=20.0, tau=0.01,
        discount_denom=5, discount_min=0.95, discount_max=0.995, entropy_coef=1e-4, dropout=0.0,
        enc_dim=c["enc_dim"], mlp_dim=c["mlp_dim"], latent_dim=c["latent_dim"], num_enc_layers=c["num_enc_layers"],
        num_q=c["num_q"], num_bins=c["num_bins"], vmin=c["vmin"], vmax=c["vmax"], simnorm_dim=c["simnorm_dim"],
        log_std_min=c["log_std_min"], log_std_max=c["log_std_max"], expl_log_std_min=c["expl_log_std_min"],
        expl_log_std_max=c["expl_log_std_max"], **PLAN)
    cfg["bin_size"] = (cfg["vmax"] - cfg["vmin"]) / (cfg["num_bins"] - 1)
    return types.SimpleNamespace(**cfg)


def perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if t.is_floating_point() and not t.is_meta and t.numel() > 1 and "log_std" not in name:
                t.add_(0.1 * torch.randn(t.shape, generator=g))
        model._target_Qs_params.data.copy_(model._Qs.params.data)
        for t in model._target_Qs_params.values(True, True):
            t.add_(0.05 * torch.randn(t.shape, generator=g))


@contextlib.contextmanager
def peer_modules(root: Path):
    """Import from the peer's folder ``root`` without leaving its modules behind: BMPC's top-level ``common`` and
    ``bmpc`` would otherwise shadow TD-MPC2's ``common`` (../shared/peers/tdmpc2_peer.py) for every later import in
    the same process (the test session). Modules of those names imported before are restored afterwards."""
    def ours(name):
        return name in ("bmpc", "common") or name.startswith(("bmpc.", "common."))

    before = {name: mod for name, mod in sys.modules.items() if ours(name)}
    for name in before:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for name in [name for name in sys.modules if ours(name)]:
            del sys.modules[name]
        sys.modules.update(before)


def generate(archive: Path = ARCHIVE) -> dict:
    with peer_modules(unpack(archive)):
        return _generate()


def _generate() -> dict:
    from bmpc import BMPC
    from common import math as bmpc_math

    cfg = peer_config()
    torch.manual_seed(SEEDS["weights"])
    agent = BMPC(cfg)
    model = agent.model
    perturb(model, SEEDS["weights"] + 100)
    model.eval()
    c = CONFIG
    O, A, H, B = c["obs_dim"], c["action_dim"], c["horizon"], c["batch_size"]

    # ---- world-model outputs (eval mode) ----
    g = torch.Generator().manual_seed(SEEDS["batch"])
    obs7, act7, eps7 = torch.randn(7, O, generator=g), torch.rand(7, A, generator=g) * 2 - 1, torch.randn(7, A, generator=g)
    with torch.no_grad():
        z = model.encode(obs7, None)
        v_logits = model._Qs(z)
        mean_raw, log_std_raw = model._pi(z).chunk(2, dim=-1)
        log_std = bmpc_math.log_std(log_std_raw, model.log_std_min, model.log_std_dif)
        expl_log_std = bmpc_math.log_std(log_std_raw, model.expl_log_std_min, model.expl_log_std_dif)
        outputs = dict(
            latent=z, next_latent=model.next(z, act7, None), reward_logits=model.reward(z, act7, None),
            reward=bmpc_math.two_hot_inv(model.reward(z, act7, None), cfg), v_logits=v_logits,
            v=bmpc_math.two_hot_inv(v_logits, cfg), target_v_logits=model._target_Qs(z),
            v_avg=model.V(z, None, return_type="avg"), target_v_avg=model.V(z, None, return_type="avg", target=True),
            pi_mean=torch.tanh(mean_raw), pi_log_std=log_std, pi_expl_log_std=expl_log_std,
            pi_action=(torch.tanh(mean_raw) + eps7 * log_std.exp()).clamp(-1, 1))
    model_ref = dict(inputs=dict(observation=obs7, action=act7, eps=eps7), outputs=outputs)

    # ---- one update: value targets, world-model losses, policy KL loss ----
    weights = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and not v.is_meta}
    obs = torch.randn(H + 1, B, O, generator=g)
    action = torch.rand(H, B, A, generator=g) * 2 - 1
    reward = torch.randn(H, B, 1, generator=g)
    loc = torch.rand(H, B, A, generator=g) * 2 - 1
    scale = 0.05 + torch.rand(H, B, A, generator=g)
    missing = torch.rand(H, B, 1, generator=g) < 0.25  # no planner distribution there (seed steps, resets)
    loc, scale = loc.masked_fill(missing, float("nan")), scale.masked_fill(missing, float("nan"))
    # BMPC's update() replaces NaN by N(0, 1) before calling _update (same operations):
    mean_e, std_e = torch.cat([loc, scale], dim=-1).chunk(2, dim=-1)
    nan = torch.isnan(mean_e)
    mean_e[nan], std_e[nan] = torch.zeros_like(action[nan]), torch.ones_like(action[nan])
    expert = torch.cat([mean_e, std_e], dim=-1)
    with torch.no_grad():
        true_zs = model.encode(obs, None)
        torch.manual_seed(SEEDS["target"])
        td_target = agent._td_target_V(true_zs[:-1], None)
        zs = [model.encode(obs[0], None)]  # the latent rollout _update makes (its zs), for update_pi below
        for t in range(H):
            zs.append(model.next(zs[-1], action[t], None))
        zs = torch.stack(zs)
    torch.manual_seed(SEEDS["target"])
    info = agent._update(obs, action, reward, expert, pretrain=True)  # the world-model step (no policy step)
    model.load_state_dict({**model.state_dict(), **weights})  # back to the reference weights
    torch.manual_seed(SEEDS["pi"])
    pi_info = agent.update_pi(zs, expert, None)
    model.load_state_dict({**model.state_dict(), **weights})
    model.eval()
    update_ref = dict(
        inputs=dict(obs=obs, action=action, reward=reward, expert_loc=loc, expert_scale=scale),
        td_target=td_target, latents=zs, consistency_loss=info["consistency_loss"], reward_loss=info["reward_loss"],
        value_loss=info["value_loss"], total_loss=info["total_loss"], grad_norm=info["grad_norm"],
        pi_loss=pi_info["pi_loss"], pi_scale=pi_info["pi_scale"], pi_grad_norm=pi_info["pi_grad_norm"],
        pi_scaled_entropy=pi_info["pi_scaled_entropy"])

    # ---- one lazy reanalyze: MPPI re-plans 6 states from scratch with the exploration prior ----
    obs_r = obs[:-1, :REANALYZE_STATES // H].reshape(REANALYZE_STATES, O)  # BMPC's obs[:-1, :n] rows
    sizes = dict(num_samples=PLAN["num_samples"], num_pi_trajs=PLAN["num_pi_trajs"], iterations=PLAN["iterations"],
                 horizon=H, action_dim=A)
    noise = torch.randn(REANALYZE_STATES, mppi_noise_size(**sizes),
                        generator=torch.Generator().manual_seed(SEEDS["noise"]))
    draws = mppi_draws(noise, **sizes, terminal_prior=False, batched=True)  # BMPC's objective is V(z_H)
    with pinned_randomness(bmpc_math, draws, noise, A) as (feeder, _), torch.no_grad():
        _, plan_info = agent._plan(obs_r, REANALYZE_STATES, t0=True, task=None, horizon=H, update_prev_mean=False,
                                   reanalyze=True)
    assert not feeder.draws, f"{len(feeder.draws)} planned noise draws were not consumed"
    expert_loc, expert_scale = plan_info["action_dist"].chunk(2, dim=-1)
    reanalyze_ref = dict(observation=obs_r, noise=noise, planner=dict(PLAN, horizon=H), expert_loc=expert_loc,
                         expert_scale=expert_scale, action_value=plan_info["action_value"])

    # ---- acting: BMPC's own MPPI over ACTING_STEPS warm-started steps of one env, exploration mode ----
    obs_a = torch.randn(ACTING_STEPS, 1, O, generator=torch.Generator().manual_seed(SEEDS["acting"]))
    noise_a = torch.randn(ACTING_STEPS, 1, mppi_noise_size(**sizes),
                          generator=torch.Generator().manual_seed(SEEDS["acting"] + 1))
    acting = {k: [] for k in ("action", "expert_loc", "expert_scale", "mean")}
    for t in range(ACTING_STEPS):
        draws = mppi_draws(noise_a[t], **sizes, terminal_prior=False, batched=True)
        with pinned_randomness(bmpc_math, draws, noise_a[t], A) as (feeder, _), torch.no_grad():
            action, plan_info = agent._plan(obs_a[t], 1, t0=(t == 0), eval_mode=False, task=None, horizon=H)
        assert not feeder.draws, f"{len(feeder.draws)} planned noise draws were not consumed"
        loc, scale = plan_info["action_dist"].chunk(2, dim=-1)
        for key, value in (("action", action), ("expert_loc", loc), ("expert_scale", scale),
                           ("mean", agent._prev_mean)):
            acting[key].append(value.clone())
    acting_ref = dict(observation=obs_a, noise=noise_a, **{k: torch.stack(v) for k, v in acting.items()})

    # (The functional ensemble's data-less module shells and TensorDict metadata entries are left out.)
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()
                  if isinstance(v, torch.Tensor) and not v.is_meta}
    return {"source": "github.com/wertyuilife2/bmpc@d5dabc6 (MIT), tests/data/bmpc_reference.py",
            "torch": str(torch.__version__), "config": dict(CONFIG, dropout=0.0, discount=agent.discount, **PLAN),
            "seeds": dict(SEEDS), "state_dict": state_dict, "model": model_ref, "update": update_ref,
            "reanalyze": reanalyze_ref, "acting": acting_ref}


def _detached(x):
    if isinstance(x, dict):
        return {k: _detached(v) for k, v in x.items()}
    return x.detach().clone().contiguous() if isinstance(x, torch.Tensor) else x


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    reference = _detached(generate(args.archive))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference, args.out)
    scalars = {k: round(float(v), 6) for k, v in reference["update"].items() if isinstance(v, torch.Tensor)
               and v.numel() == 1}
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB): {scalars}")
