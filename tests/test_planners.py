"""Planners: Dream-MPC (GradientMPCPlanner), TD-MPC2's MPPI and the policy prior as TorchRL actors.

The optimization tests run in a linear-quadratic world model written here, whose optimal open-loop action
sequence is known in closed form; the interface tests run on a tiny TDMPC2WorldModel.
"""
import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_dreammpc import envs
from torchrl_dreammpc.modules import TDMPC2WorldModel, WorldModelBase
from torchrl_dreammpc.planners import (
    GradientMPCPlanner,
    LatentPlannerBase,
    MPPIPlanner,
    NonFiniteActionError,
    PolicyActor,
)

TINY = dict(enc_dim=32, mlp_dim=32, latent_dim=16)
EVAL = ExplorationType.DETERMINISTIC
RANDOM = ExplorationType.RANDOM


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(obs_dim=5, action_dim=2, **kw):
    torch.manual_seed(0)
    # num_q=2: TD-MPC2's "avg" over two random heads is then the mean of both, so planning is reproducible.
    return TDMPC2WorldModel(obs_dim, action_dim, model_size=1, num_q=2, **{**TINY, **kw}).eval()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def perturbed_model(**kw):
    """tiny_model with its zero-initialized reward and Q output layers perturbed: the imagined return then depends
    on the actions, so gradient steps move them."""
    wm = tiny_model(**kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        last_q = getattr(wm.q_ensemble, f"weight_{wm.q_ensemble.num_layers - 1}")
        for t in (wm.reward_head.module.net[-1].weight, last_q):
            t.add_(0.5 * torch.randn(t.shape, generator=g))
    return wm


def obs_td(obs, is_init=None):
    td = TensorDict({"observation": obs}, obs.shape[:-1])
    if is_init is not None:
        td["is_init"] = torch.as_tensor(is_init, dtype=torch.bool).reshape(*obs.shape[:-1], 1)
    return td


# ---------------------------------------------------------------------------------------------- test models
class LinearQuadraticModel(WorldModelBase):
    """z' = A z + B a; r = -(zᵀQz + aᵀRa); Q_k(z, a) = -zᵀP_k z (K slightly different heads, "avg" = their mean);
    policy prior = a fixed, deliberately bad linear gain with Gaussian noise, tanh-squashed. float64."""

    def __init__(self, latent_dim=3, action_dim=2, num_heads=3, discount=0.9, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        L, A = latent_dim, action_dim
        self.obs_dim, self.latent_dim, self.action_dim, self.discount = L, L, A, discount
        dt = torch.float64
        self.register_buffer("A", 0.9 * torch.eye(L, dtype=dt) + 0.1 * torch.randn(L, L, generator=g, dtype=dt))
        self.register_buffer("B", 0.5 * torch.randn(L, A, generator=g, dtype=dt))
        self.register_buffer("Q", torch.diag(torch.linspace(0.5, 1.5, L, dtype=dt)))
        self.register_buffer("R", 0.1 * torch.eye(A, dtype=dt))
        self.register_buffer("P", torch.stack([(1.0 + 0.1 * k) * torch.eye(L, dtype=dt) for k in range(num_heads)]))
        self.register_buffer("K", 2.0 * torch.ones(L, A, dtype=dt))  # bad gain: pushes z away from 0
        self.in_keys, self.out_keys = ["observation"], ["latent"]

    def forward(self, td):
        return td.set("latent", self.encode(td["observation"]))

    def encode(self, obs):
        return obs

    def next(self, z, a):
        return z @ self.A.T + a @ self.B.T

    def reward(self, z, a):
        return -(((z @ self.Q) * z).sum(-1, keepdim=True) + ((a @ self.R) * a).sum(-1, keepdim=True))

    def value(self, z, a, reduce="avg"):
        q = -torch.einsum("...i,kij,...j->k...", z, self.P, z).unsqueeze(-1)  # [K, *B, 1]
        if reduce == "all":
            return q
        return q.min(0).values if reduce == "min" else q.mean(0)

    def policy(self, z, deterministic=False, eps=None):
        mean = z @ self.K
        log_std = torch.full_like(mean, -1.0)
        if deterministic:
            return torch.tanh(mean), torch.tanh(mean), log_std
        eps = torch.randn_like(mean) if eps is None else eps
        return torch.tanh(mean + eps * log_std.exp()), torch.tanh(mean), log_std

    # ---- closed form of the open-loop problem from z0 (H steps, terminal value with the heads' mean P̄) ----
    def quadratic_form(self, z0, H):
        """J(a) = -(aᵀ M a + 2 cᵀ a + const) over the stacked a ∈ R^{H·A}; returns (M, c)."""
        L, A, g = self.latent_dim, self.action_dim, self.discount
        M = torch.zeros(H * A, H * A, dtype=torch.float64)
        c = torch.zeros(H * A, dtype=torch.float64)
        for t in range(H + 1):
            F = torch.linalg.matrix_power(self.A, t)
            G = torch.zeros(L, H * A, dtype=torch.float64)
            for s in range(t):
                G[:, s * A:(s + 1) * A] = torch.linalg.matrix_power(self.A, t - 1 - s) @ self.B
            W = self.Q if t < H else self.P.mean(0)
            M += g ** t * G.T @ W @ G
            c += g ** t * G.T @ W @ F @ z0
            if t < H:
                E = torch.zeros(A, H * A, dtype=torch.float64)
                E[:, t * A:(t + 1) * A] = torch.eye(A, dtype=torch.float64)
                M += g ** t * E.T @ self.R @ E
        return M, c

    def optimum(self, z0, H):
        M, c = self.quadratic_form(z0, H)
        return torch.linalg.solve(M, -c).view(H, self.action_dim), M


class ForkModel(WorldModelBase):
    """1-D: z' = z + a, r = -a², Q_k = V + s_k·relu(z) with s = (-1, 0, 1): every head agrees for z <= 0 and they
    disagree for z > 0, while their mean is V everywhere. The prior proposes a = ±c (the sign of its noise), so
    candidates +c and -c have exactly the same return but different uncertainty."""

    obs_dim = latent_dim = action_dim = 1
    discount = 0.9

    def __init__(self, V=2.0, c=0.5):
        super().__init__()
        self.V, self.c = V, c
        self.register_buffer("s", torch.tensor([-1.0, 0.0, 1.0]))
        self.in_keys, self.out_keys = ["observation"], ["latent"]

    def forward(self, td):
        return td

    def encode(self, obs):
        return obs

    def next(self, z, a):
        return z + a

    def reward(self, z, a):
        return -a.square()

    def value(self, z, a, reduce="avg"):
        q = self.V + self.s.view(-1, *[1] * z.dim()) * torch.relu(z).unsqueeze(0)
        return q if reduce == "all" else q.mean(0)

    def policy(self, z, deterministic=False, eps=None):
        mean = torch.zeros_like(z)
        if deterministic:
            return mean, mean, mean
        return self.c * torch.sign(eps), mean, mean


# ---------------------------------------------------------------------------------------------- optimization
Z0 = torch.tensor([0.6, -0.4, 0.3], dtype=torch.float64)
H = 3


def test_lq_optimum_is_inside_the_bounds():
    a_star, _ = LinearQuadraticModel().optimum(Z0, H)
    assert a_star.abs().max() < 0.9  # so the clamp to [-1, 1] does not bind and the QP is the true optimum


def test_gradient_ascent_increases_J_monotonically():
    wm = LinearQuadraticModel()
    _, M = wm.optimum(Z0, H)
    lr = 0.5 / torch.linalg.eigvalsh(M).max().item()  # J's Hessian is -2M: lr <= 1/(2 λmax) is a descent step
    J = []
    for k in range(12):
        planner = GradientMPCPlanner(wm, num_candidates=1, horizon=H, iterations=k, lr=lr, uncertainty_weight=0.0,
                                     max_grad_norm=None, diagnostics=True, generator=gen(3))
        td = planner(obs_td(Z0))
        J.append(td["planner", "objective_after"].item())
        assert td["planner", "objective_before"].item() == pytest.approx(J[0], abs=1e-12)
    diffs = torch.diff(torch.tensor(J))
    assert (diffs > 0).all(), J
    assert J[-1] - J[0] > 0.05


def test_gradient_planner_converges_to_the_analytic_optimum_mppi_close_policy_not():
    wm = LinearQuadraticModel()
    a_star, M = wm.optimum(Z0, H)
    lr = 0.5 / torch.linalg.eigvalsh(M).max().item()

    def gap(seq):  # J* - J(seq) = (a - a*)ᵀ M (a - a*)
        d = (seq - a_star).reshape(-1)
        return (d @ M @ d).item()

    with set_exploration_type(EVAL):
        grad = GradientMPCPlanner(wm, num_candidates=5, horizon=H, iterations=400, lr=lr, uncertainty_weight=0.0,
                                  generator=gen(0))
        a_grad = grad(obs_td(Z0))["action"]
        mppi = MPPIPlanner(wm, horizon=H, eval_selection="mean", generator=gen(0))
        a_mppi = mppi(obs_td(Z0))["action"]
        a_pi = PolicyActor(wm)(obs_td(Z0))["action"]
    # Dream-MPC: every candidate reaches the optimum of the quadratic program.
    torch.testing.assert_close(grad.last_plan[0], a_star.expand(5, H, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(a_grad, a_star[0], atol=1e-6, rtol=0)
    # MPPI: close to the optimum, far closer than the prior.
    rollout = [wm.policy(Z0, deterministic=True)[0]]
    z = Z0
    for _ in range(H - 1):
        z = wm.next(z, rollout[-1])
        rollout.append(wm.policy(z, deterministic=True)[0])
    gap_mppi, gap_pi = gap(mppi.last_plan[0]), gap(torch.stack(rollout))
    assert (a_mppi - a_star[0]).abs().max() < 0.15  # 0.08 with this seed; the prior is off by 0.66
    assert gap_mppi < 0.05 * gap_pi, (gap_mppi, gap_pi)
    # The policy prior alone is far off.
    assert (a_pi - a_star[0]).abs().max() > 0.5


def test_uncertainty_penalty_picks_the_certain_candidate():
    # Find a seed whose first candidate is the uncertain one (+c) and which also proposes a certain one (-c):
    # with equal returns, λ = 0 keeps the first (argmax ties → first index), λ > 0 must switch to a -c one.
    N = 4
    kw = dict(num_candidates=N, horizon=1, iterations=0, diagnostics=True)

    def prior_noise(seed):  # the candidates' noise (first N numbers of the step's draw, see the noise layout)
        return GradientMPCPlanner(ForkModel(), generator=gen(seed), **kw).draw_noise(1, "cpu", torch.float32)[0, :N]

    seed = next(s for s in range(100) if (lambda e: e[0] > 0 and (e[1:] < 0).any())(prior_noise(s)))
    obs = torch.zeros(1)
    td0 = GradientMPCPlanner(ForkModel(), uncertainty_weight=0.0, generator=gen(seed), **kw)(obs_td(obs))
    td1 = GradientMPCPlanner(ForkModel(), uncertainty_weight=0.1, generator=gen(seed), **kw)(obs_td(obs))
    assert td0["action"].item() == pytest.approx(0.5) and td0["planner", "candidate"].item() == 0
    assert td1["action"].item() == pytest.approx(-0.5)
    assert td0["planner", "uncertainty"].item() > 0 and td1["planner", "uncertainty"].item() == 0


def test_uncertainty_grad_follows_the_penalty_gradient():
    # One SGD step from +c: the return gradient is -2a; with uncertainty_grad the penalty adds -λ·V·std(s) = -λV.
    lam, lr, V = 0.1, 0.05, 2.0
    kw = dict(num_candidates=1, horizon=1, iterations=1, lr=lr, uncertainty_weight=lam, max_grad_norm=None)
    seed = next(s for s in range(100)
                if GradientMPCPlanner(ForkModel(), generator=gen(s), **kw).draw_noise(1, "cpu", torch.float32)[0, 0] > 0)
    plain = GradientMPCPlanner(ForkModel(V=V), uncertainty_grad=False, generator=gen(seed), **kw)
    follow = GradientMPCPlanner(ForkModel(V=V), uncertainty_grad=True, generator=gen(seed), **kw)
    plain(obs_td(torch.zeros(1)))
    follow(obs_td(torch.zeros(1)))
    assert plain.last_plan.item() == pytest.approx(0.5 - lr * 2 * 0.5)
    assert follow.last_plan.item() == pytest.approx(0.5 - lr * 2 * 0.5 - lr * lam * V)


def test_world_model_parameters_get_no_gradient():
    wm = tiny_model()
    GradientMPCPlanner(wm, iterations=2, uncertainty_grad=True)(obs_td(torch.randn(3, 5)))
    assert all(p.grad is None for p in wm.parameters())


# ---------------------------------------------------------------------------------------------- warm start
def test_warm_start_uses_the_shifted_previous_solution_and_is_init_resets_it():
    wm = tiny_model()
    obs1, obs2 = torch.randn(4, 5), torch.randn(4, 5)
    kw = dict(num_candidates=3, horizon=4, iterations=0)
    keep = GradientMPCPlanner(wm, warm_start_weight=1.0, generator=gen(1), **kw)
    half = GradientMPCPlanner(wm, warm_start_weight=0.5, generator=gen(1), **kw)
    none = GradientMPCPlanner(wm, warm_start_weight=0.0, generator=gen(1), **kw)
    for p in (keep, half, none):
        p(obs_td(obs1, [True] * 4))
    plan1 = keep.last_plan.clone()  # [B, N, H, A]
    torch.testing.assert_close(half.last_plan, plan1)
    is_init = [True, False, False, True]
    for p in (keep, half, none):
        p(obs_td(obs2, is_init))
    shifted = torch.cat([plan1[:, :, 1:], plan1[:, :, -1:]], dim=2)
    fresh = none.last_plan  # the prior's candidates at step 2 (same noise)
    cont = torch.tensor([not i for i in is_init])
    # rho = 1 with no gradient step: continuing envs replay the shifted plan exactly, reset envs the prior.
    assert torch.equal(keep.last_plan[cont], shifted[cont])
    assert torch.equal(keep.last_plan[~cont], fresh[~cont])
    assert not torch.allclose(shifted[cont], fresh[cont])
    torch.testing.assert_close(half.last_plan[cont], 0.5 * shifted[cont] + 0.5 * fresh[cont])
    torch.testing.assert_close(half.last_plan[~cont], fresh[~cont])


def test_warm_start_without_is_init_carries_over_and_reset_clears_it():
    wm = tiny_model()
    obs1, obs2 = torch.randn(2, 5), torch.randn(2, 5)
    a, b, c = (GradientMPCPlanner(wm, warm_start_weight=1.0, iterations=0, generator=gen(5)) for _ in range(3))
    for p in (a, b, c):
        p(obs_td(obs1))
    a(obs_td(obs2))  # no "is_init": continue
    b(obs_td(obs2, [False, False]))
    c.reset()
    c(obs_td(obs2))
    assert torch.equal(a.last_plan, b.last_plan)
    d = GradientMPCPlanner(wm, warm_start_weight=0.0, iterations=0, generator=gen(5))
    d(obs_td(obs1))
    d(obs_td(obs2))
    assert torch.equal(c.last_plan, d.last_plan) and not torch.equal(a.last_plan, d.last_plan)
    # A new batch size is a new set of envs: the state is rebuilt without warm start.
    a(obs_td(torch.randn(3, 5)))
    assert a.last_plan.shape[0] == 3


def test_mppi_warm_start_and_reset():
    wm = tiny_model()
    obs1, obs2 = torch.randn(5), torch.randn(5)
    kw = dict(num_samples=32, num_elites=4, iterations=2, num_pi_trajs=4)
    p1, p2, p3 = (MPPIPlanner(wm, generator=gen(2), **kw) for _ in range(3))
    with set_exploration_type(EVAL):
        for p in (p1, p2, p3):
            p(obs_td(obs1))
        p3.reset()
        a1 = p1(obs_td(obs2, True))["action"]
        a2 = p2(obs_td(obs2, False))["action"]
        a3 = p3(obs_td(obs2))["action"]
    assert torch.equal(a1, a3) and not torch.equal(a1, a2)
    assert p1.last_plan.shape == (1, 3, 2)


# ---------------------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("make", [
    lambda wm, g: GradientMPCPlanner(wm, generator=g, diagnostics=True),
    lambda wm, g: GradientMPCPlanner(wm, iterations=2, uncertainty_grad=True, exploration_std=0.3, generator=g),
    lambda wm, g: MPPIPlanner(wm, num_samples=48, num_elites=6, iterations=2, num_pi_trajs=8, generator=g),
    lambda wm, g: PolicyActor(wm, generator=g),
], ids=["dream-mpc", "dream-mpc-ugrad-noise", "mppi", "policy"])
def test_batched_equals_single_env_calls(make):
    # Weights in the heads (J must differ between candidates and envs, or every env picks candidate 0), and float64:
    # in float32 a batched product sums in another order, which MPPI's weights amplify to ~1e-3.
    wm = perturbed_model().double()
    B = 8
    obs = [torch.randn(B, 5, dtype=torch.float64), torch.randn(B, 5, dtype=torch.float64)]
    is_init = [[True] * B, [False, True, False, False, True, False, False, False]]
    batched = make(wm, gen(7))
    chosen = []
    g = gen(7)  # one generator shared by the single-env planners, called env after env
    singles = [make(wm, g) for _ in range(B)]
    with set_exploration_type(RANDOM):
        for step in range(2):
            out = batched(obs_td(obs[step], is_init[step]))
            outs = [singles[b](obs_td(obs[step][b], is_init[step][b])) for b in range(B)]
            torch.testing.assert_close(out["action"], torch.stack([o["action"] for o in outs]), atol=1e-9, rtol=0)
            if "planner" in out.keys():
                torch.testing.assert_close(out["planner", "candidate"], torch.stack([o["planner", "candidate"] for o in outs]))
                chosen.append(out["planner", "candidate"])
    assert out["action"].shape == (B, 2) and outs[0]["action"].shape == (2,)
    if chosen:  # the envs chose different candidates: the per-env ranking was exercised
        assert len(torch.cat(chosen).unique()) > 1


@pytest.mark.parametrize("make", [GradientMPCPlanner, lambda wm: MPPIPlanner(wm, num_samples=16, num_elites=2,
                                                                               num_pi_trajs=2), PolicyActor])
def test_planners_act_with_the_model_in_train_then_eval_mode(make):
    """In train() mode the planning ops are the model itself: holding them must not register the model as a second
    submodule of the planner (a later eval()-mode step then failed with a TypeError)."""
    wm = tiny_model()
    planner = make(wm)
    for train in (True, False, True):
        wm.train(train)
        assert planner(obs_td(torch.randn(3, 5)))["action"].shape == (3, 2)
    assert [name for name, _ in planner.named_children()] == ["world_model"]


def test_unbatched_and_multi_dim_batches():
    wm = tiny_model()
    planner = GradientMPCPlanner(wm, diagnostics=True)
    td = planner(obs_td(torch.randn(2, 4, 5)))
    assert td["action"].shape == (2, 4, 2) and planner.last_plan.shape == (8, 5, 3, 2)
    assert td["planner", "objective_after"].shape == (2, 4, 1) and td["planner", "candidate"].dtype == torch.long
    assert td["planner", "uncertainty"].shape == (2, 4, 1)
    td = planner(obs_td(torch.randn(5)))
    assert td["action"].shape == (2,) and td["planner", "candidate"].shape == (1,)
    assert ((td["action"] >= -1) & (td["action"] <= 1)).all()


def test_inference_mode_and_no_grad_callers():
    # Under inference_mode / no_grad (how collectors call actors) the gradient steps must still be taken: the plan
    # equals a normal call's on the same noise, and differs from the plan without gradient steps.
    wm = perturbed_model()
    obs = torch.randn(3, 5)
    normal = GradientMPCPlanner(wm, iterations=2, generator=gen(3))
    a_ref = normal(obs_td(obs))["action"]
    for context in (torch.inference_mode, torch.no_grad):
        planner = GradientMPCPlanner(wm, iterations=2, generator=gen(3))
        with context():
            a = planner(obs_td(obs))["action"]
        assert torch.equal(a, a_ref) and torch.equal(planner.last_plan, normal.last_plan), context.__name__
    unoptimized = GradientMPCPlanner(wm, iterations=0, generator=gen(3))
    with torch.inference_mode():
        unoptimized(obs_td(obs))
    assert (unoptimized.last_plan - normal.last_plan).abs().max() > 1e-3  # the gradient steps moved the plan


def test_reset_env_mask_forgets_only_those_envs():
    wm = tiny_model()
    obs1, obs2 = torch.randn(4, 5), torch.randn(4, 5)
    mask = torch.tensor([True, False, False, True])
    kw = dict(warm_start_weight=1.0, iterations=0)
    by_reset, by_is_init = (GradientMPCPlanner(wm, generator=gen(6), **kw) for _ in range(2))
    for planner in (by_reset, by_is_init):
        planner(obs_td(obs1))
    first = by_reset.last_plan.clone()
    by_reset.reset(mask)
    by_reset(obs_td(obs2))
    by_is_init(obs_td(obs2, mask))
    # reset(env_mask) is the same as is_init=mask: masked envs plan from the prior, the others replay their plan
    assert torch.equal(by_reset.last_plan, by_is_init.last_plan)
    shifted = torch.cat([first[:, :, 1:], first[:, :, -1:]], dim=2)
    assert torch.equal(by_reset.last_plan[~mask], shifted[~mask])
    assert not torch.allclose(by_reset.last_plan[mask], shifted[mask])
    with pytest.raises(ValueError, match="env_mask has 3 entries but the planner holds state for 4 envs"):
        by_reset.reset(torch.tensor([True, False, True]))


# ---------------------------------------------------------------------------------------------- bounds, modes
def test_action_bounds_from_spec_and_low_high():
    wm = perturbed_model()  # (a gradient to step along: lr=10 then takes the plan far out of the box, unclamped)
    spec = Bounded(torch.tensor([-0.2, -0.5]), torch.tensor([0.1, 0.5]), shape=(2,))
    obs = torch.randn(16, 5) * 3
    for planner in (GradientMPCPlanner(wm, action_spec=spec, lr=10.0), MPPIPlanner(wm, action_spec=spec, num_samples=32, num_elites=4),
                    PolicyActor(wm, low=spec.space.low, high=spec.space.high)):
        a = planner(obs_td(obs))["action"]
        assert (a >= spec.space.low).all() and (a <= spec.space.high).all()
        if isinstance(planner, GradientMPCPlanner):
            lp = planner.last_plan
            assert (lp >= spec.space.low).all() and (lp <= spec.space.high).all()
    assert torch.equal(PolicyActor(wm, action_spec=Bounded(-1.0, 1.0, shape=(4, 2))).action_low, -torch.ones(2))


def test_exploration_modes():
    wm = tiny_model()
    obs = obs_td(torch.randn(6, 5))
    actor = PolicyActor(wm)
    with set_exploration_type(EVAL):
        d1, d2 = actor(obs.clone())["action"], actor(obs.clone())["action"]
    with set_exploration_type(RANDOM):
        r1 = actor(obs.clone())["action"]
    torch.testing.assert_close(d1, torch.tanh(wm.policy_params(wm.encode(obs["observation"]))[0]))
    assert torch.equal(d1, d2) and not torch.allclose(r1, d1)
    # Dream-MPC: the exploration noise is added in RANDOM mode only; the plan itself is identical.
    modes = {}
    for mode in (EVAL, RANDOM):
        p = GradientMPCPlanner(wm, exploration_std=0.5, generator=gen(4))
        with set_exploration_type(mode):
            modes[mode] = (p(obs.clone())["action"], p.last_plan)
    assert torch.equal(modes[EVAL][1], modes[RANDOM][1])
    assert (modes[EVAL][0] - modes[RANDOM][0]).abs().max() > 0.05
    # MPPI in eval mode with "best" or "mean" selection does not depend on the selection noise (the number behind
    # the categorical draw over the elites, noise[:, -A - 1]); with "sample" it does. Two calls whose noise differs
    # in that number only, on a model whose elites differ.
    scored = perturbed_model()
    for sel, depends in (("best", False), ("mean", False), ("sample", True)):
        actions = []
        for u in (-3.0, 3.0):
            planner = MPPIPlanner(scored, num_samples=32, num_elites=4, eval_selection=sel, generator=gen(9))
            draw = planner.draw_noise

            def draw_with_selection(batch, device, dtype, draw=draw, u=u):
                noise = draw(batch, device, dtype)
                noise[:, -scored.action_dim - 1] = u
                return noise

            planner.draw_noise = draw_with_selection
            with set_exploration_type(EVAL):
                actions.append(planner(obs.clone())["action"])
        assert torch.equal(actions[0], actions[1]) != depends, sel


def test_diagnostics_gradient_step_improves_J():
    wm = LinearQuadraticModel()
    planner = GradientMPCPlanner(wm, lr=0.05, uncertainty_weight=0.0, diagnostics=True, generator=gen(0))
    td = planner(obs_td(torch.stack([Z0, -Z0, 0.5 * Z0])))
    assert (td["planner", "objective_after"] > td["planner", "objective_before"]).all()
    assert ((td["planner", "candidate"] >= 0) & (td["planner", "candidate"] < 5)).all()
    assert "planner" not in GradientMPCPlanner(wm)(obs_td(Z0)).keys()
    td = MPPIPlanner(wm, num_samples=64, num_elites=8, diagnostics=True)(obs_td(Z0))
    assert td["planner", "objective_after"].shape == (1,)
    assert td["planner", "uncertainty"].item() != 0  # the LQ heads disagree everywhere but at z = 0


def test_episodic_models_drop_rewards_after_termination():
    class Ends(LinearQuadraticModel):
        def termination(self, z):  # every imagined step ends the episode
            return torch.ones(*z.shape[:-1], 1, dtype=z.dtype)

    wm, ends = LinearQuadraticModel(), Ends()
    planner = GradientMPCPlanner(ends, horizon=3)
    a = torch.zeros(3, 1, 2, dtype=torch.float64)
    ret_all, _ = GradientMPCPlanner(wm, horizon=3).imagine(Z0[None], a, None)
    ret_end, unc = planner.imagine(Z0[None], a, None, uncertainty=True)
    r0 = wm.reward(Z0[None], a[0])
    torch.testing.assert_close(ret_end, r0)  # only the first reward survives
    assert ret_all.item() < r0.item()


class WallModel(ForkModel):
    """1-D, z' = z + a, r = -a², Q = V; the episode ends (termination probability 1) once z >= 1."""

    def termination(self, z):
        return (z >= 1.0).to(z.dtype)


def test_imagined_return_stops_at_the_predicted_termination():
    V, g = 2.0, 0.9
    planner = GradientMPCPlanner(WallModel(V=V), horizon=3, uncertainty_weight=0.0)
    # row 0 walks into the wall at z_2 = 1.2; row 1 never reaches it (z_3 = 0.6)
    actions = torch.tensor([[0.6, 0.2]] * 3).unsqueeze(-1)  # [H=3, M=2, A=1]
    ret, _ = planner.imagine(torch.zeros(2, 1), actions, None)
    # row 0: r_0 and r_1 (the transition that ends the episode) count; r_2 and the terminal value do not
    assert ret[0].item() == pytest.approx(-0.36 - g * 0.36)
    assert ret[1].item() == pytest.approx(-0.04 * (1 + g + g ** 2) + g ** 3 * V)


def test_tdmpc2_episodic_imagine_matches_a_hand_computation():
    """The fused planning path of an episodic TDMPC2WorldModel against the model's own methods, step by step:
    rewards, the terminal value and the disagreement penalty after the first predicted termination are dropped.

    In float64: the penalty is a standard deviation over near-equal Q heads, so in float32 the fused and the
    step-by-step paths differ by rounding that depends on the machine's matrix kernels (2.1e-5 relative on one
    machine, under 1e-5 on another); in float64 they agree to ~1e-14, so a tight tolerance tests the logic."""
    wm = perturbed_model(episodic=True).double()
    with torch.no_grad():  # sharpen the termination head so that episodes end at different steps per candidate
        wm.termination_head.module[-1].weight.mul_(200.0)
    H, M = 3, 64
    g = torch.Generator().manual_seed(2)
    z0 = wm.encode(torch.randn(M, 5, generator=g).double())
    actions = (torch.rand(H, M, 2, generator=g) * 2 - 1).double()
    planner = GradientMPCPlanner(wm, horizon=H)
    with torch.no_grad():
        ret, unc = planner.imagine(z0, actions, None, uncertainty=True)
        z, alive = z0, torch.ones(M, 1, dtype=torch.float64)
        expected, penalty, alive_at = torch.zeros_like(alive), torch.zeros_like(alive), []
        for t in range(H):
            expected += wm.discount ** t * alive * wm.reward(z, actions[t])
            penalty += alive * wm.value_disagreement(z, actions[t])
            z = wm.next(z, actions[t])
            alive = alive * (wm.termination(z) <= 0.5).double()
            alive_at.append(alive)
        a_H = wm.policy(z, deterministic=True)[0]
        expected += wm.discount ** H * alive * wm.value(z, a_H, reduce="avg")
        penalty += alive * wm.value_disagreement(z, a_H)
    alive_at = torch.cat(alive_at, 1)  # [M, H]
    assert 0 < alive_at.sum() < alive_at.numel() and (alive_at[:, 0] > alive_at[:, -1]).any()  # a mix of endings
    torch.testing.assert_close(ret, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(unc, penalty, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("cls,kwargs,name", [
    (GradientMPCPlanner, dict(num_candidates=0), "num_candidates"),
    (GradientMPCPlanner, dict(horizon=0), "horizon"),
    (GradientMPCPlanner, dict(iterations=-1), "iterations"),
    (GradientMPCPlanner, dict(lr=0.0), "lr"),
    (GradientMPCPlanner, dict(warm_start_weight=1.5), "warm_start_weight"),
    (GradientMPCPlanner, dict(uncertainty_weight=-0.1), "uncertainty_weight"),
    (GradientMPCPlanner, dict(max_grad_norm=0.0), "max_grad_norm"),
    (GradientMPCPlanner, dict(exploration_std=-1.0), "exploration_std"),
    (GradientMPCPlanner, dict(num_candidates=2.5), "num_candidates"),
    (MPPIPlanner, dict(num_samples=8, num_elites=16), "num_elites"),
    (MPPIPlanner, dict(num_samples=8, num_elites=4, num_pi_trajs=9), "num_pi_trajs"),
    (MPPIPlanner, dict(iterations=0), "iterations"),
    (MPPIPlanner, dict(temperature=0.0), "temperature"),
    (MPPIPlanner, dict(min_std=0.5, max_std=0.1), "max_std"),
    (MPPIPlanner, dict(eval_selection="argmax"), "eval_selection"),
    (GradientMPCPlanner, dict(lr=float("inf")), "lr must be a finite real number, got inf"),
    (GradientMPCPlanner, dict(exploration_std=float("inf")), "exploration_std must be a finite"),
    (GradientMPCPlanner, dict(max_grad_norm=float("nan")), "max_grad_norm must be a finite"),
    (GradientMPCPlanner, dict(uncertainty_weight=float("inf")), "uncertainty_weight must be a finite"),
    (MPPIPlanner, dict(temperature=float("inf")), "temperature must be a finite"),
    (MPPIPlanner, dict(max_std=float("inf")), "max_std must be a finite"),
    (GradientMPCPlanner, dict(uncertainty_grad="false"), r"uncertainty_grad must be true or false, got 'false' \(str\)"),
    (GradientMPCPlanner, dict(diagnostics="true"), "diagnostics must be true or false"),
    (MPPIPlanner, dict(check_finite="no"), "check_finite must be true or false"),
    (PolicyActor, dict(compile="fast"), r"compile must be true, false or a torch.compile mode \(default, "),
    (GradientMPCPlanner, dict(compile=1), "compile must be true, false or a torch.compile mode"),
    (PolicyActor, dict(generator=0), "generator must be a torch.Generator"),
    (PolicyActor, dict(low=1.0, high=-1.0), "low < high"),
    (PolicyActor, dict(low=[-1.0, -1.0, -1.0]), "bounds must have 2"),
])
def test_invalid_config_raises(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(tiny_model(), **kwargs)


def test_wrong_observation_width_raises():
    planner = GradientMPCPlanner(tiny_model())
    with pytest.raises(ValueError, match="observation has width 4"):
        planner(obs_td(torch.randn(3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        GradientMPCPlanner(tiny_model(), check_finite=True)(obs_td(torch.full((5,), float("nan"))))
    with pytest.raises(TypeError, match="WorldModelBase"):
        GradientMPCPlanner(torch.nn.Linear(2, 2))


PLANNER_MAKERS = [
    lambda wm, **kw: GradientMPCPlanner(wm, **kw),
    lambda wm, **kw: MPPIPlanner(wm, num_samples=32, num_elites=4, iterations=2, num_pi_trajs=4, **kw),
    lambda wm, **kw: PolicyActor(wm, **kw),
]


@pytest.mark.parametrize("make", PLANNER_MAKERS, ids=["dream-mpc", "mppi", "policy"])
def test_nan_observation_is_refused_by_default(make):
    wm = tiny_model()
    obs = torch.randn(3, 5)
    obs[1, 2] = float("nan")
    planner = make(wm)
    planner(obs_td(torch.randn(3, 5)))  # a finite step first: the warm start must be dropped by the failure
    with pytest.raises(NonFiniteActionError, match=r"observation 'observation' holds 1 NaN/inf value\(s\) \(in env"
                                                   r"\(s\) \[1\]"):
        planner(obs_td(obs))
    assert planner.last_plan is None
    # check_finite=False is the opt-out: the NaN goes through (Dream-MPC, the prior), or MPPI, whose NaN scores
    # count as 0 (TD-MPC2), returns a finite action picked at random: what the default check exists to refuse
    unchecked = make(wm, check_finite=False)(obs_td(obs))["action"]
    assert torch.isfinite(unchecked[1]).all() == isinstance(planner, MPPIPlanner)


@pytest.mark.parametrize("make", PLANNER_MAKERS[:2], ids=["dream-mpc", "mppi"])
def test_nan_weights_are_named(make):
    # NaN Q weights: Dream-MPC's gradient turns the action NaN; MPPI's NaN scores (TD-MPC2 maps them to 0) would
    # pick a random finite action, which the check of the executed plan's score refuses.
    wm = tiny_model()
    with torch.no_grad():
        wm.q_ensemble.weight_0[0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteActionError, match=r"parameter 'qvalue.module.net.weight_0' holds 1 NaN/inf"):
        make(wm)(obs_td(torch.randn(2, 5)))


def test_check_finite_default_follows_the_observation_device():
    # None: checked for CPU observations (no extra device sync), skipped for device-resident ones (a host sync
    # per step); True / False force it.
    auto, always, never = (GradientMPCPlanner(tiny_model(), check_finite=c) for c in (None, True, False))
    cpu, device = torch.zeros(2, 5), torch.zeros(2, 5, device="meta")
    assert auto._checks_finite(cpu) and not auto._checks_finite(device)
    assert always._checks_finite(device) and not never._checks_finite(cpu)
    # the fast path sums; finite values whose sum overflows are re-checked exactly and pass
    auto._check_finite_step(torch.full((2, 5), 3e38), torch.zeros(2, 2), torch.zeros(2, 1))
    with pytest.raises(NonFiniteActionError, match="imagined return of the executed plan"):
        auto._check_finite_step(torch.zeros(2, 5), torch.zeros(2, 2), torch.tensor([[0.0], [float("-inf")]]))


def test_all_planners_share_the_base():
    assert all(issubclass(c, LatentPlannerBase) for c in (GradientMPCPlanner, MPPIPlanner, PolicyActor))
    p = GradientMPCPlanner(tiny_model())
    assert p.in_keys == ["observation", "is_init"] and p.out_keys == ["action"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda():
    wm = tiny_model().cuda()
    for planner in (GradientMPCPlanner(wm), MPPIPlanner(wm, num_samples=32, num_elites=4), PolicyActor(wm)):
        td = planner(obs_td(torch.randn(4, 5, device="cuda"), [True] * 4))
        assert td["action"].device.type == "cuda" and td["action"].shape == (4, 2)
        td = planner(obs_td(torch.randn(4, 5, device="cuda"), [False] * 4))
        assert torch.isfinite(td["action"]).all()


# ---------------------------------------------------------------------------------------------- TorchRL integration
@pytest.fixture(scope="module")
def cartpole():
    env = envs.make_env("cartpole-swingup")
    yield env
    env.close()


def test_rollout_and_collector_on_cartpole(cartpole):
    from torchrl.collectors import Collector

    obs_dim = cartpole.observation_spec["observation"].shape[-1]
    act_dim = cartpole.action_spec.shape[-1]
    wm = TDMPC2WorldModel(obs_dim, act_dim, model_size=1, **TINY).eval()
    planner = GradientMPCPlanner(wm, action_spec=cartpole.action_spec, diagnostics=True)
    with set_exploration_type(EVAL):
        ro = cartpole.rollout(5, policy=planner)
    assert ro["action"].shape == (5, act_dim) and ro["planner", "objective_after"].shape == (5, 1)
    assert ro["is_init"][0].item() and not ro["is_init"][1:].any()

    # A batched env (2 envs in one TorchRL env): one warm start per env, reset by each env's own "is_init".
    batched_env = envs.make_env("cartpole-swingup", num_envs=2)
    mppi = MPPIPlanner(wm, action_spec=batched_env.action_spec, num_samples=32, num_elites=4, iterations=2)
    ro = batched_env.rollout(3, policy=mppi)
    batched_env.close()
    assert ro["action"].shape == (2, 3, act_dim) and mppi.last_plan.shape == (2, 3, act_dim)

    collector = Collector(cartpole, GradientMPCPlanner(wm), frames_per_batch=8, total_frames=16)
    frames = 0
    for batch in collector:
        assert batch["action"].shape == (8, act_dim)
        assert ((batch["action"] >= -1) & (batch["action"] <= 1)).all()
        frames += batch.numel()
    collector.shutdown()
    assert frames == 16


@pytest.mark.slow
def test_multi_sync_collector_on_cartpole():
    # Worker processes rebuild the env and receive a copy of the planner: each keeps its own warm-start state.
    # With one candidate, horizon 1, no gradient step and a full warm start (rho = 1), a planner that keeps its
    # state replays its first action for the whole episode: each worker's actions are constant (and differ
    # between the differently seeded workers); a planner that lost its state between calls would draw a new
    # prior sample every step.
    import functools

    from torchrl.collectors import MultiSyncCollector

    wm = TDMPC2WorldModel(5, 1, model_size=1, **TINY).eval()
    planner = GradientMPCPlanner(wm, num_candidates=1, horizon=1, iterations=0, warm_start_weight=1.0)
    collector = MultiSyncCollector([functools.partial(envs.make_env, "cartpole-swingup")] * 2, planner,
                                   frames_per_batch=16, total_frames=32, cat_results="stack")
    collector.set_seed(3)
    batches = []
    for batch in collector:
        assert ((batch["action"] >= -1) & (batch["action"] <= 1)).all()
        batches.append(batch)
    collector.shutdown()
    data = torch.cat(batches, dim=1)  # [workers, steps]
    assert data.shape == (2, 16) and data["is_init"][:, 0].all() and not data["is_init"][:, 1:].any()
    actions = data["action"].squeeze(-1)
    assert (actions == actions[:, :1]).all(), actions
    assert actions[0, 0] != actions[1, 0]
    # the same planner without a warm start does vary within an episode (so the assertion above can fail)
    fresh = GradientMPCPlanner(wm, num_candidates=1, horizon=1, iterations=0, warm_start_weight=0.0)
    varied = torch.stack([fresh(obs_td(o))["action"] for o in data["observation"][0, :4]])
    assert not (varied == varied[:1]).all()


def test_uncertainty_penalty_needs_two_q_heads():
    one_head = TDMPC2WorldModel(5, 2, model_size=1, enc_dim=16, mlp_dim=16, latent_dim=16, num_q=1).eval()
    with pytest.raises(ValueError, match=r"uncertainty_weight=0.01 needs a value ensemble of at least 2.*num_q=1"):
        GradientMPCPlanner(one_head, uncertainty_weight=0.01)
    with pytest.raises(ValueError, match=r"uncertainty_weight=0.5 needs a value ensemble of at least 2.*num_q=1"):
        MPPIPlanner(one_head, uncertainty_weight=0.5)
    planner = GradientMPCPlanner(one_head, uncertainty_weight=0.0)  # no penalty: a single head is fine
    assert torch.isfinite(planner(obs_td(torch.randn(3, 5)))["action"]).all()
