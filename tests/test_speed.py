"""Exactness of the optimized planning paths (no timing here: benchmarks/speed.py measures).

The planners evaluate a TDMPC2WorldModel through :class:`TDMPC2PlanningOps` (functional, detached weights,
split first layers, latents shared across candidates, per-head Q evaluation, fused objective). Everything here
checks that those paths compute what the plain world-model calls compute, on the same inputs and noise.
"""
import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_dreammpc.modules import TDMPC2WorldModel
from torchrl_dreammpc.modules import planning
from torchrl_dreammpc.modules.layers import mish as _mish
from torchrl_dreammpc.modules.planning import TDMPC2PlanningOps, simnorm
from torchrl_dreammpc.planners import GradientMPCPlanner, MPPIPlanner, PolicyActor

SMALL = dict(enc_dim=32, mlp_dim=48, latent_dim=16)
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
DEFAULT_PER_HEAD_ELEMS = planning._PER_HEAD_ELEMS


@pytest.fixture(autouse=True)
def per_head_at_small_sizes(monkeypatch):
    """The per-head Q ensemble starts at a size (rows x members x width) that these small models reach only with a
    lower threshold: from ~250 rows with 2 heads of width 48 (~100 rows with 5), so that many-row cases take it."""
    monkeypatch.setattr(planning, "_PER_HEAD_ELEMS", 256 * 2 * SMALL["mlp_dim"])


def model(num_q=2, episodic=False, obs_dim=5, action_dim=2, **kw):
    torch.manual_seed(0)
    wm = TDMPC2WorldModel(obs_dim, action_dim, model_size=1, num_q=num_q, episodic=episodic, **{**SMALL, **kw})
    with torch.no_grad():  # the reward and Q output layers start at zero: give every head something to say
        for p in wm.parameters():
            p.add_(0.1 * torch.randn_like(p))
        wm.target_q_ensemble.load_state_dict(wm.q_ensemble.state_dict())
    return wm.eval()


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


def plain_objective(wm, z0, actions, eps_H, discount, uncertainty):
    """The planners' objective from the world model's own methods, step by step."""
    H = actions.shape[0]
    z, zs, ret = z0, [z0], 0.0
    for t in range(H):
        ret = ret + discount ** t * wm.reward(z, actions[t])
        z = wm.next(z, actions[t])
        zs.append(z)
    a_H = wm.policy(z, eps=eps_H)[0]
    ret = ret + discount ** H * wm.value(z, a_H, reduce="avg")
    if not uncertainty:
        return ret, None
    unc = sum(wm.value_disagreement(zt, at) for zt, at in zip(zs, [*actions, a_H]))
    return ret, unc


# ---------------------------------------------------------------------------------------------- the ops
@pytest.mark.parametrize("num_q", [2, 5])
@pytest.mark.parametrize("rows", [3, 300])  # few rows and many rows take different paths (shared, per-head)
def test_planning_ops_equal_the_model_methods(num_q, rows):
    wm = model(num_q)
    ops = wm.planning_ops()
    assert isinstance(ops, TDMPC2PlanningOps)
    obs, a, eps = torch.randn(rows, 5), torch.rand(rows, 2) * 2 - 1, torch.randn(rows, 2)
    z = wm.encode(obs)
    close(ops.encode(obs), z)
    close(ops.next(z, a), wm.next(z, a))
    close(ops.reward(z, a), wm.reward(z, a))
    for x, y in zip(ops.policy(z, eps=eps), wm.policy(z, eps=eps)):
        close(x, y)
    for x, y in zip(ops.policy(z, deterministic=True), wm.policy(z, deterministic=True)):
        close(x, y)
    close(ops.policy_action(z, eps), wm.policy(z, eps=eps)[0])
    close(ops.value(z, a, "all"), wm.value(z, a, "all"))
    for reduce in ("avg", "min"):  # the same random pair of heads on the same RNG state
        torch.manual_seed(1)
        x = ops.value(z, a, reduce)
        torch.manual_seed(1)
        close(x, wm.value(z, a, reduce))
    torch.manual_seed(2)
    x = ops.value_and_disagreement(z, a)
    torch.manual_seed(2)
    for u, v in zip(x, wm.value_and_disagreement(z, a)):
        close(u, v)
    close(ops.value_disagreement(z, a), wm.value_disagreement(z, a))
    z3, a3 = torch.stack([z, z.flip(0)]), torch.stack([a, -a])  # extra batch dims
    close(ops.next(z3, a3), wm.next(z3, a3))
    close(ops.value(z3, a3, "all"), wm.value(z3, a3, "all"))


@pytest.mark.parametrize("rows", [3, 40, 300])
def test_device_side_q_pair_equals_the_model(rows, monkeypatch):
    """The pair of Q heads as compiled code and GPUs draw it (indices kept on the device): all heads then the pair
    for few rows, the pair's gathered weights from ``_GATHER_PAIR_ROWS`` rows; same heads, same values."""
    monkeypatch.setattr(planning, "_HOST_PAIR", False)
    assert planning._GATHER_PAIR_ROWS <= 40  # 3 rows: all heads; 40 and 300: the pair's weights gathered
    wm = model(num_q=5)
    ops = wm.planning_ops()
    z, a = wm.encode(torch.randn(rows, 5)), torch.rand(rows, 2) * 2 - 1
    for reduce in ("avg", "min"):
        torch.manual_seed(3)
        x = ops.value(z, a, reduce)
        torch.manual_seed(3)
        close(x, wm.value(z, a, reduce))
    z.requires_grad_(True)
    torch.manual_seed(4)
    (gz,) = torch.autograd.grad(ops.value(z, a).sum(), z)
    torch.manual_seed(4)
    (gz_ref,) = torch.autograd.grad(wm.value(z, a).sum(), z)
    close(gz, gz_ref)


def test_planning_ops_gradients_flow_to_the_inputs_only():
    wm = model(num_q=5)
    ops = wm.planning_ops()
    z = wm.encode(torch.randn(4, 5))
    a = (torch.rand(4, 2) * 2 - 1).requires_grad_(True)

    def objective(m):
        torch.manual_seed(3)
        z1 = m.next(z, a)
        return (m.reward(z, a) + m.value(z1, m.policy(z1, eps=torch.ones(4, 2))[0], "avg")).sum()

    (g_ops,) = torch.autograd.grad(objective(ops), a)
    (g_wm,) = torch.autograd.grad(objective(wm), a)
    close(g_ops, g_wm)
    assert all(p.grad is None for p in wm.parameters())


def test_episodic_termination():
    wm = model(episodic=True)
    z = wm.encode(torch.randn(6, 5))
    close(wm.planning_ops().termination(z), wm.termination(z))


def test_planning_ops_cache_follows_the_weights():
    wm = model()
    ops = wm.planning_ops()
    assert wm.planning_ops() is ops
    z, a = wm.encode(torch.randn(3, 5)), torch.zeros(3, 2)
    with torch.no_grad():  # in place (optimizer steps, load_state_dict, target updates): same cache, new values
        wm.dynamics.module.net[0].weight.mul_(2.0)
    assert wm.planning_ops() is ops
    close(ops.next(z, a), wm.next(z, a))
    # a replaced parameter, a replaced layer, a dtype change: rebuilt
    layer = wm.reward_head.module.net[0]
    layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight))
    ops2 = wm.planning_ops()
    assert ops2 is not ops
    close(ops2.reward(z, a), wm.reward(z, a))
    wm.reward_head.module.net[-1] = torch.nn.Linear(SMALL["mlp_dim"], 101)
    ops3 = wm.planning_ops()
    assert ops3 is not ops2
    close(ops3.reward(z, a), wm.reward(z, a))
    wm.double()
    assert wm.planning_ops().decode(torch.zeros(1, 101, dtype=torch.float64)).dtype == torch.float64
    wm.train()
    assert wm.planning_ops() is wm  # train mode (dropout): the model itself


def test_fast_elementwise_kernels():
    x = torch.linspace(-40, 40, 20001).view(-1, 1).expand(-1, 3).contiguous()
    with torch.no_grad():
        close(_mish(x.clone()), F.mish(x), atol=2e-6)
    x.requires_grad_(True)
    y = _mish(x)
    assert type(y.grad_fn).__name__.startswith("_FastMish")
    close(y, F.mish(x), atol=2e-6)
    w = torch.randn_like(x)
    close(torch.autograd.grad((y * w).sum(), x)[0], torch.autograd.grad((F.mish(x) * w).sum(), x)[0], atol=1e-5)
    for shape in [(5, 16), (3, 4, 64), (40, 512), (2000, 64)]:
        for grad in (False, True):
            x = (torch.randn(*shape) * 5).requires_grad_(grad)
            ref = F.softmax(x.unflatten(-1, (-1, 8)), -1).view(shape)
            out = simnorm(x, 8)
            close(out, ref)
            if grad:
                w = torch.randn(shape)
                close(torch.autograd.grad((out * w).sum(), x)[0], torch.autograd.grad((ref * w).sum(), x)[0])


# ---------------------------------------------------------------------------------------------- the objective
@pytest.mark.parametrize("num_q", [2, 5])
@pytest.mark.parametrize("B,N", [(1, 5), (8, 5), (4, 32)])  # M < 64 and M >= 64 take different fused paths
@pytest.mark.parametrize("uncertainty", [False, True])
def test_fused_objective_equals_the_plain_sum_of_model_calls(num_q, B, N, uncertainty):
    wm = model(num_q)
    planner = GradientMPCPlanner(wm, num_candidates=N)
    H, M = 3, B * N
    z0 = wm.encode(torch.randn(B, 5))
    actions = (torch.rand(H, M, 2) * 2 - 1).requires_grad_(True)
    eps_H = torch.randn(M, 2)
    torch.manual_seed(4)
    ret, unc = planner.imagine(z0, actions, eps_H, uncertainty=uncertainty)  # z0 shared by N rows each
    torch.manual_seed(4)
    ref_ret, ref_unc = plain_objective(wm, z0.repeat_interleave(N, 0), actions, eps_H, wm.discount, uncertainty)
    close(ret, ref_ret)
    if uncertainty:
        close(unc, ref_unc)
    else:
        assert unc is None
    (g,) = torch.autograd.grad(ret.sum(), actions)
    (g_ref,) = torch.autograd.grad(ref_ret.sum(), actions)
    close(g, g_ref)
    # The same objective with the start latents already repeated per row.
    torch.manual_seed(4)
    ret2, _ = planner.imagine(z0.repeat_interleave(N, 0), actions, eps_H, uncertainty=uncertainty)
    close(ret2, ref_ret)


def test_episodic_objective_falls_back_to_the_plain_path():
    wm = model(episodic=True)
    planner = GradientMPCPlanner(wm)
    z0 = wm.encode(torch.randn(2, 5))
    actions = torch.rand(3, 10, 2) * 2 - 1
    ret, unc = planner.imagine(z0, actions, None, uncertainty=True)
    assert ret.shape == unc.shape == (10, 1) and torch.isfinite(ret).all()


@pytest.mark.parametrize("B,k", [(1, 5), (3, 40)])
def test_prior_rollout_equals_the_plain_loop(B, k):
    wm = model()
    planner = GradientMPCPlanner(wm)
    H, M = 3, B * k
    z0 = wm.encode(torch.randn(B, 5))
    eps = torch.randn(H, M, 2)
    with torch.no_grad():
        got = planner.rollout_prior(z0, eps)
        z, ref = z0.repeat_interleave(k, 0), []
        for t in range(H):
            ref.append(wm.policy(z, eps=eps[t])[0])
            z = wm.next(z, ref[-1])
    close(got, torch.stack(ref))


# ---------------------------------------------------------------------------------------------- whole steps
def obs_td(obs, is_init):
    return TensorDict({"observation": obs, "is_init": torch.full((*obs.shape[:-1], 1), is_init)}, obs.shape[:-1])


@pytest.mark.parametrize("make", [
    lambda wm, g: GradientMPCPlanner(wm, generator=g, diagnostics=True),
    lambda wm, g: GradientMPCPlanner(wm, num_candidates=16, iterations=2, uncertainty_grad=True, generator=g),
    lambda wm, g: MPPIPlanner(wm, num_samples=96, num_elites=8, iterations=2, num_pi_trajs=8, generator=g),
    lambda wm, g: PolicyActor(wm, generator=g),
], ids=["dream-mpc", "dream-mpc-16-ugrad", "mppi", "policy"])
def test_optimized_step_equals_the_plain_model_path(make, monkeypatch):
    """A whole control step through the optimized ops equals the same step through the model's own methods."""
    wm = model()
    fast, plain = make(wm, torch.Generator().manual_seed(5)), make(wm, torch.Generator().manual_seed(5))
    obs = [torch.randn(8, 5), torch.randn(8, 5)]
    with set_exploration_type(ExplorationType.RANDOM):
        for step in range(2):
            out_fast = fast(obs_td(obs[step], step == 0))
            with monkeypatch.context() as m:
                m.setattr(type(wm), "planning_ops", lambda self: self)
                out_plain = plain(obs_td(obs[step], step == 0))
            close(out_fast["action"], out_plain["action"])
            if fast.last_plan is not None:
                close(fast.last_plan, plain.last_plan)


def test_batched_equals_single_env_calls_on_the_shared_latent_path():
    """8 envs x 16 candidates (128 rows: shared start latents) against 8 single-env calls (16 rows each)."""
    wm = model()
    B = 8
    batched = GradientMPCPlanner(wm, num_candidates=16, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    singles = [GradientMPCPlanner(wm, num_candidates=16, generator=g) for _ in range(B)]
    obs = torch.randn(B, 5)
    with set_exploration_type(ExplorationType.RANDOM):
        for step in range(2):
            out = batched(obs_td(obs, step == 0))
            outs = [singles[b](obs_td(obs[b], step == 0)) for b in range(B)]
            close(out["action"], torch.stack([o["action"] for o in outs]))


@pytest.mark.slow
def test_compiled_planner_equals_eager():
    wm = model()
    eager = GradientMPCPlanner(wm, generator=torch.Generator().manual_seed(9))
    compiled = GradientMPCPlanner(wm, generator=torch.Generator().manual_seed(9), compile=True)
    obs = torch.randn(2, 5)
    with set_exploration_type(ExplorationType.RANDOM):
        for step in range(2):
            close(compiled(obs_td(obs, step == 0))["action"], eager(obs_td(obs, step == 0))["action"])


@pytest.mark.slow
@pytest.mark.parametrize("rows", [3, 40])  # compiled: all heads then the pair / the pair's weights gathered
def test_compiled_q_pair_is_one_pair_of_heads(rows):
    """Under torch.compile the random pair comes from the compiled RNG stream (not comparable with eager), so the
    check is that the result is the mean of one pair of distinct heads, the same pair for every row."""
    wm = model(num_q=5)
    ops = wm.planning_ops()
    z, a = wm.encode(torch.randn(rows, 5)), torch.rand(rows, 2) * 2 - 1
    value = torch.compile(lambda z, a: ops.value(z, a, "avg"), dynamic=False)
    q = wm.value(z, a, "all")  # [5, rows, 1]
    pairs = {(i, j): (q[i] + q[j]) / 2 for i in range(5) for j in range(i + 1, 5)}
    for _ in range(3):
        got = value(z, a)
        matches = [ij for ij, ref in pairs.items() if torch.allclose(got, ref, atol=ATOL, rtol=1e-5)]
        assert len(matches) == 1, matches


def test_compile_flag_is_validated():
    with pytest.raises(ValueError, match="compile"):
        GradientMPCPlanner(model(), compile=3)


def test_thresholds_are_sane():
    # A single-env Dream-MPC call (N=5 rows) repeats its start latent and runs the Q ensemble as one product.
    assert planning._SHARED_ROWS_FROM > 8 and planning._GATHER_PAIR_ROWS > 5
    wm = TDMPC2WorldModel(24, 6, model_size=5)
    assert 5 * 4 * wm.config.num_q * wm.config.mlp_dim < DEFAULT_PER_HEAD_ELEMS  # its ranking pass: (H+1)·N rows
