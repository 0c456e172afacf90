"""A lean, functional view of a :class:`~torchrl_dreammpc.modules.TDMPC2WorldModel` for the planners' hot loop.

A Dream-MPC control step is ~30 network evaluations on a handful of rows: its cost is the number of kernels it
launches and small matrix products, not FLOPs; an MPPI step is FLOP-bound, with a large share of element-wise work.
:class:`TDMPC2PlanningOps` computes exactly what the world model's tensor methods compute (``encode``, ``next``,
``reward``, ``policy``, ``value``, ``value_and_disagreement``, ``termination``), with less of both:

- no ``nn.Module`` / ``TensorDictModule`` calls: ``addmm`` / ``layer_norm`` / ``mish`` on the raw weights;
- the weights are *detached* views (same storage: optimizer steps and ``load_state_dict`` are seen at once), so
  gradients flow to the inputs only (what the planners differentiate) and autograd records smaller graphs;
- the first layer of every ``(z, a)`` network is split into its latent and action columns, ``W [z; a] =
  W_z z + W_a a``: no ``cat``, and a latent shared by many rows (the start latent of all of an env's MPPI samples
  or Dream-MPC candidates, and of the prior's rollouts) is multiplied once;
- the planners' objective is one fused function (:meth:`TDMPC2PlanningOps.imagine`): rewards of the whole
  horizon in one pass when there are few rows (per step, while in cache, when there are many), the discounted sum
  as one ``[1, H+1] @ [H+1, M]`` product;
- the random pair of Q heads of ``reduce="avg"`` is drawn as the model draws it (one ``randperm`` on the model's
  device); on a CPU only those two members are evaluated, on views of their weights (no gather of the stacked
  ensemble weights); with many rows on a CPU the ensemble runs member by member (intermediates stay in L2);
- SimNorm as a softmax over the transposed groups (:func:`simnorm`: ATen's softmax over a last dim of 8 is
  ~150 ns per group), Mish in its sigmoid form for large tensors outside autograd (:func:`~torchrl_dreammpc.modules.layers.mish`), two-hot
  decoding ``softmax → @ bins → copysign(expm1(|x|), x)`` (three kernels for ``symexp`` instead of six).

On the same inputs and RNG state the results agree with the module path to float rounding (tests/test_speed.py).
Dropout is not implemented: in ``train()`` mode the world model hands out itself
(:meth:`TDMPC2WorldModel.planning_ops`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from torchrl_dreammpc.modules.base import _stacked, state_action_trajectory_values
from torchrl_dreammpc.modules.layers import mish


__all__ = ["TDMPC2PlanningOps", "BMPCPlanningOps", "simnorm"]

# Below this many rows a latent shared by several rows (the start latent of every candidate) is simply repeated:
# the shared-row products only pay off in FLOPs when there are many rows (MPPI), and cost extra kernels.
_SHARED_ROWS_FROM = 64
# On a CPU the Q ensemble runs member by member once its hidden activations (rows x members x width floats) would
# outgrow the L2 cache (2**18 floats = 1 MiB): each member's intermediates then stay in cache. A size, not a row
# count: the 5M model's 5x512 members reach it at ~100 rows (a batched Dream-MPC ranking pass of 8 envs, 160 rows),
# the 1M model's 2x384 at ~340 (MPPI).
_PER_HEAD_ELEMS = 2 ** 18
# On a CPU, evaluate only the two random Q heads of reduce="avg"/"min" (their indices read on the host: no sync).
_HOST_PAIR = True
# Where the pair's indices stay on the device (compiled code, GPUs): from this many rows gather the two members'
# weights (one copy of 2/K of the ensemble) rather than evaluate all K members and drop K-2 of them (K/2 times the
# Q products). Measured at 40 rows (5M model, K=5, compiled Dream-MPC call for 8 envs: 28.5 -> 25.8 ms,
# benchmarks/planner_ab.py); 16 sits between that and a single-env call's 5 rows, which keeps evaluating all members.
_GATHER_PAIR_ROWS = 16


def _symexp(x: torch.Tensor) -> torch.Tensor:
    # sign(x) * (exp(|x|) - 1) in three kernels. (Its derivative at exactly 0 is 0 rather than 1: unreachable in
    # practice, since a decoded two-hot expectation is exactly 0 only for a constant — zero-initialized — head.)
    return torch.expm1(x.abs()).copysign(x)


def simnorm(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """SimNorm: a softmax over consecutive groups of ``group_size`` features (the last dim a multiple of it).

    ATen's softmax over a last dimension of 8 is slow on CPU (its kernel vectorizes along the softmax dimension:
    ~150 ns per group), so the softmax runs over dim 1 of the ``[rows, group_size, groups]`` transpose instead,
    where it vectorizes across groups (5-9x faster for 5-512 rows), or, for many rows, as ``exp(x - max) / sum``
    over the groups. Same function (max-subtracted softmax); results agree to float rounding (~1e-7). Tiny inputs
    under autograd and ``torch.compile`` (inductor fuses it) keep the plain softmax. (:class:`SimNorm` itself keeps
    ATen's kernel: the checkpoint tests compare its exact rounding against the reference implementation.)
    """
    shape = x.shape
    rows = x.numel() // max(shape[-1], 1)
    grad = x.requires_grad and torch.is_grad_enabled()
    if torch.compiler.is_compiling() or (grad and rows * shape[-1] < 256 * group_size):
        # (Tiny inputs under autograd: the transposes' backward costs more than the slow kernel saves.)
        return F.softmax(x.unflatten(-1, (-1, group_size)), dim=-1).view(shape)
    g = x.reshape(rows, shape[-1] // group_size, group_size)
    if rows <= 1024:
        return F.softmax(g.transpose(1, 2), dim=1).transpose(1, 2).reshape(shape)
    if grad:
        e = (g - g.amax(-1, keepdim=True)).exp()
        return (e / e.sum(-1, keepdim=True)).view(shape)
    e = (g - g.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True)).view(shape)


def _mlp_params(seq):
    """Per layer of an ``mlp`` (NormedLinear..., then Linear or NormedLinear with an output activation):
    ``(weight, bias, ln_weight, ln_bias, ln_eps, activation)``; the activation is ``"mish"``, ``("simnorm", group)``,
    another module, or ``None`` for a plain Linear."""
    layers = []
    for m in seq:
        w, b = m.weight.detach(), m.bias.detach()
        ln = getattr(m, "ln", None)
        if ln is None:
            layers.append((w, b, None, None, None, None))
            continue
        act = m.act
        name = type(act).__name__
        kind = "mish" if name == "Mish" else (("simnorm", act.group_size) if name == "SimNorm" else act)
        layers.append((w, b, ln.weight.detach(), ln.bias.detach(), ln.eps, kind))
    return layers


class _MLP:
    """A TD-MPC2 ``mlp`` as raw tensors. ``split`` > 0: the first layer's input is ``(z, a)`` with ``z`` of width
    ``split`` (its weight kept as the two transposed column blocks: ``W [z; a] = W_z z + W_a a``, no ``cat``)."""

    def __init__(self, seq, split: int = 0):
        layers = _mlp_params(seq)
        w0, b0 = layers[0][0], layers[0][1]
        self.split = split
        if split:
            self.w0z_t, self.w0a_t = w0[:, :split].t(), w0[:, split:].t()
        else:
            self.w0_t = w0.t()
        self.b0 = b0
        self.layers = [(w.t(), *rest) for (w, *rest) in layers]
        self.out_dim = layers[-1][0].shape[0]

    def _post(self, h: torch.Tensor, i: int) -> torch.Tensor:
        _, _, lw, lb, eps, act = self.layers[i]
        if lw is None:
            return h
        h = F.layer_norm(h, (h.shape[-1],), lw, lb, eps)
        if act == "mish":
            return mish(h)
        if type(act) is tuple:
            return simnorm(h, act[1])
        return act(h)

    def first(self, x: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-activation of the first layer, 2-D ``[rows, out]`` (``x``, ``a`` already 2-D). ``x`` may have
        fewer rows than ``a`` (``rows(a) = k · rows(x)``): each latent is then shared by ``k`` consecutive rows of
        ``a`` and its product is computed once."""
        if not self.split:
            return torch.addmm(self.b0, x, self.w0_t)
        if x.shape[0] == a.shape[0]:
            return torch.addmm(self.b0, x, self.w0z_t).addmm_(a, self.w0a_t)
        R, M = x.shape[0], a.shape[0]
        hz = torch.addmm(self.b0, x, self.w0z_t)  # [R, out]
        return torch.mm(a, self.w0a_t).view(R, M // R, -1).add_(hz.unsqueeze(1)).view(M, -1)

    def rest(self, h: torch.Tensor) -> torch.Tensor:
        h = self._post(h, 0)
        for i in range(1, len(self.layers)):
            w_t, b = self.layers[i][0], self.layers[i][1]
            h = self._post(torch.addmm(b, h, w_t), i)
        return h

    def __call__(self, x: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
        if a is not None and x.shape[:-1] != a.shape[:-1]:
            batch = torch.broadcast_shapes(x.shape[:-1], a.shape[:-1])
            x, a = x.expand(*batch, x.shape[-1]), a.expand(*batch, a.shape[-1])
        batch = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        a2 = None if a is None else a.reshape(-1, a.shape[-1])
        return self.rest(self.first(x2, a2)).view(*batch, self.out_dim)


class _Ensemble:
    """The value ensemble (``EnsembleMLP``) as raw tensors, first layer split into latent / action columns (a
    state-value ensemble, whose input is the latent alone, has no action columns: call it with ``a=None``)."""

    def __init__(self, ens, latent_dim: int):
        L = latent_dim
        layers = ens.layer_tensors(detach=True)
        self.k, self.num_layers, self.out_dim = ens.num_members, ens.num_layers, ens.out_dim
        w0, b0, lw0, lb0 = layers[0]
        K, out0 = w0.shape[0], w0.shape[1]
        self.hidden = out0
        self.has_action = w0.shape[-1] > L
        self.w0z_t = w0[:, :, :L].reshape(K * out0, L).t()  # [L, K*out]
        self.w0a_t = w0[:, :, L:].reshape(K * out0, -1).t()  # [A, K*out] (empty for a state-value ensemble)
        self.b0 = b0.reshape(-1)
        self.ln0 = (lw0, lb0)
        self.rest_layers = [(w.transpose(1, 2), b.unsqueeze(1), *ts) for (w, b, *ts) in layers[1:]]
        self.layers = layers
        self.L = L
        # Per member, views (no copies): (w0z_t, w0a_t, b0, lnw0, lnb0), then (w_t, b, [lnw, lnb]) per layer.
        self.members = []
        for k in range(K):
            first = (w0[k, :, :L].t(), w0[k, :, L:].t(), b0[k], lw0[k], lb0[k])
            rest = [tuple([w[k].t(), b[k], *(t[k] for t in ts)]) for (w, b, *ts) in layers[1:]]
            self.members.append((first, rest))

    def __call__(self, z: torch.Tensor, a: torch.Tensor | None, members: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[K, *B, bins]`` of every member (or of the ``members`` indices, weights gathered)."""
        if a is not None and z.shape[:-1] != a.shape[:-1]:
            batch = torch.broadcast_shapes(z.shape[:-1], a.shape[:-1])
            z, a = z.expand(*batch, z.shape[-1]), a.expand(*batch, a.shape[-1])
        batch = z.shape[:-1]
        z2 = z.reshape(-1, z.shape[-1])
        a2 = None if a is None else a.reshape(-1, a.shape[-1])
        if (members is None and z2.shape[0] * self.k * self.hidden >= _PER_HEAD_ELEMS and z2.device.type == "cpu"
                and not torch.compiler.is_compiling()):
            # Many rows on a CPU: member by member keeps each intermediate within the L2 cache.
            return self.some(z, a, list(range(self.k)))
        if members is None:
            K, w0z_t, w0a_t, b0, (lw, lb) = self.k, self.w0z_t, self.w0a_t, self.b0, self.ln0
            rest = self.rest_layers
        else:
            K = members.shape[0]
            w0 = self.layers[0][0].index_select(0, members)
            out0 = w0.shape[1]
            w0z_t = w0[:, :, :self.L].reshape(K * out0, self.L).t()
            w0a_t = w0[:, :, self.L:].reshape(K * out0, -1).t()
            b0 = self.layers[0][1].index_select(0, members).reshape(-1)
            lw, lb = (t.index_select(0, members) for t in self.ln0)
            rest = [tuple(t.index_select(0, members) for t in ts) for ts in self.rest_layers]
        N = z2.shape[0]
        h = torch.addmm(b0, z2, w0z_t)
        if a2 is not None:
            h = h.addmm_(a2, w0a_t)
        h = h.view(N, K, -1)  # [N, K, out]
        h = mish(torch.addcmul(lb, F.layer_norm(h, (h.shape[-1],)), lw))
        h = h.transpose(0, 1)  # [K, N, out]
        for ts in rest:
            h = torch.baddbmm(ts[1], h, ts[0])
            if len(ts) > 2:
                h = mish(torch.addcmul(ts[3].unsqueeze(1), F.layer_norm(h, (h.shape[-1],)), ts[2].unsqueeze(1)))
        return h.reshape(K, *batch, h.shape[-1])

    def some(self, z: torch.Tensor, a: torch.Tensor | None, heads: list[int]) -> torch.Tensor:
        """Logits ``[len(heads), *B, bins]`` of the given members, each run on views of its own weights (no
        gather of the stacked weights; ``z`` and ``a`` of the same batch shape)."""
        batch = z.shape[:-1]
        z2 = z.reshape(-1, z.shape[-1])
        a2 = None if a is None else a.reshape(-1, a.shape[-1])
        outs = []
        for k in heads:
            (w0z_t, w0a_t, b0, lw0, lb0), rest = self.members[k]
            h = torch.addmm(b0, z2, w0z_t)
            if a2 is not None:
                h = h.addmm_(a2, w0a_t)
            h = mish(F.layer_norm(h, (h.shape[-1],), lw0, lb0))
            for ts in rest:
                h = torch.addmm(ts[1], h, ts[0])
                if len(ts) > 2:
                    h = mish(F.layer_norm(h, (h.shape[-1],), ts[2], ts[3]))
            outs.append(h)
        return torch.stack(outs).view(len(heads), *batch, outs[0].shape[-1])


class TDMPC2PlanningOps:
    """The tensor methods of a :class:`TDMPC2WorldModel` (eval mode), computed with as few kernels as possible.

    Same signatures and results as the model's own methods (``encode``, ``next``, ``reward``, ``policy``,
    ``value``, ``value_and_disagreement``, ``value_disagreement``, ``termination``), plus the planners' fused
    steps :meth:`policy_action`, :meth:`rollout_policy` and :meth:`imagine`; the weights never receive gradients.
    Get it with :meth:`TDMPC2WorldModel.planning_ops` (cached while the weights stay where they are).
    """

    def __init__(self, wm):
        cfg = wm.config
        self.action_dim, self.latent_dim, self.obs_dim = wm.action_dim, wm.latent_dim, wm.obs_dim
        self.num_q = cfg.num_q
        L = cfg.latent_dim
        self._enc = _MLP(wm.encoder.module)
        self._dyn = _MLP(wm.dynamics.module.net, L)
        self._rew = _MLP(wm.reward_head.module.net, L)
        self._pi = _MLP(wm.policy_head.module.net)
        self._term = None if wm.termination_head is None else _MLP(wm.termination_head.module)
        self._q = _Ensemble(wm.value_ensemble, L)
        self._bins = wm.two_hot.bins.detach().unsqueeze(-1)  # [bins, 1]
        lo, hi = cfg.log_std_min, cfg.log_std_max
        self._ls_scale = 0.5 * (hi - lo)
        self._ls_shift = torch.tensor(lo + 0.5 * (hi - lo), dtype=self._bins.dtype, device=self._bins.device)

    # ---------------------------------------------------------------------- helpers
    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """Two-hot logits ``[..., bins]`` → scalars ``[..., 1]`` (same as ``SymlogTwoHot.decode``)."""
        return _symexp(torch.softmax(logits, dim=-1) @ self._bins)

    def _two_random_heads(self, device) -> torch.Tensor | None:
        # The same draw as TDMPC2WorldModel._two_random_heads: one randperm on the model's device.
        k = self.num_q
        return None if k <= 2 else torch.randperm(k, device=device).narrow(0, 0, 2)

    # ---------------------------------------------------------------------- the WorldModelBase methods
    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        return self._enc(obs)

    def next(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self._dyn(z, a)

    def reward_logits(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self._rew(z, a)

    def reward(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.decode(self._rew(z, a))

    def policy_params(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._pi(z)
        A = self.action_dim
        mean, ls = out[..., :A], out[..., A:]
        return mean, torch.add(self._ls_shift, torch.tanh(ls), alpha=self._ls_scale)

    def _mean_action(self, mean: torch.Tensor) -> torch.Tensor:
        """The prior's mean action from :meth:`policy_params`' mean (TD-MPC2: ``tanh``)."""
        return torch.tanh(mean)

    def _sample_action(self, mean: torch.Tensor, eps: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """A prior sample from :meth:`policy_params`' mean and ``std`` (TD-MPC2: ``tanh(mean + eps·std)``)."""
        return torch.tanh(torch.addcmul(mean, eps, std))

    def policy_action(self, z: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """The action of :meth:`policy` alone: ``tanh(mean + eps·std)``, or ``tanh(mean)`` for ``eps=None``."""
        mean, log_std = self.policy_params(z)
        if eps is None:
            return self._mean_action(mean)
        return self._sample_action(mean, eps, log_std.exp())

    def policy(self, z: torch.Tensor, deterministic: bool = False, eps: torch.Tensor | None = None):
        mean, log_std = self.policy_params(z)
        squashed = self._mean_action(mean)
        if deterministic:
            return squashed, squashed, log_std
        if eps is None:
            eps = torch.randn_like(mean)
        return self._sample_action(mean, eps, log_std.exp()), squashed, log_std

    def q_logits(self, z: torch.Tensor, a: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        return self._q(z, a, members)

    def value(self, z: torch.Tensor, a: torch.Tensor, reduce: str = "avg") -> torch.Tensor:
        if reduce == "all":
            return self.decode(self._q(z, a))
        if reduce not in ("avg", "min"):
            raise ValueError(f"reduce must be 'all', 'avg' or 'min', got {reduce!r}")
        idx = self._two_random_heads(z.device)
        if idx is None:
            q = self.decode(self._q(z, a))
        elif (_HOST_PAIR and idx.device.type == "cpu" and z.shape[:-1] == a.shape[:-1]
              and not torch.compiler.is_compiling()):
            # The pair is known on the host without a sync: run just those two members, on views of their weights.
            q = self.decode(self._q.some(z, a, idx.tolist()))
        elif max(z[..., 0].numel(), a[..., 0].numel()) >= _GATHER_PAIR_ROWS:
            q = self.decode(self._q(z, a, members=idx))
        else:
            q = self.decode(self._q(z, a)).index_select(0, idx)
        return q.amin(0) if reduce == "min" else q.mean(0)

    def value_and_disagreement(self, z: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.decode(self._q(z, a))
        idx = self._two_random_heads(z.device)
        std, mean = torch.std_mean(q, 0)
        return (mean if idx is None else q.index_select(0, idx).mean(0)), mean * std

    def value_disagreement(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        std, mean = torch.std_mean(self.decode(self._q(z, a)), 0)
        return mean * std

    def termination(self, z: torch.Tensor) -> torch.Tensor | None:
        return None if self._term is None else torch.sigmoid(self._term(z))

    def trajectory_values(self, zs, actions: torch.Tensor, terminal_eps: torch.Tensor | None = None,
                          uncertainty: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`WorldModelBase.trajectory_values <torchrl_dreammpc.modules.WorldModelBase.trajectory_values>`
        (state-action values: ``Q̄(z_H, π(z_H))``, disagreement of ``Q_k(z_t, a_t)``)."""
        return state_action_trajectory_values(self, zs, actions, terminal_eps, uncertainty)

    # ---------------------------------------------------------------------- the planners' fused steps
    def _spread(self, z0: torch.Tensor, rows: int) -> torch.Tensor:
        """``z0 [R, L]`` for ``rows = k·R`` rows: kept shared when there are many rows, else repeated."""
        R = z0.shape[0]
        if R == rows or rows >= _SHARED_ROWS_FROM:
            return z0
        return z0.repeat_interleave(rows // R, 0)

    def rollout_policy(self, z0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Sampled rollouts of the prior: ``a_t = π(z_t)`` with noise ``eps[t]``, ``z_{t+1} = next(z_t, a_t)``.

        Args:
            z0 (Tensor): start latents ``[R, L]``, each shared by ``k = M / R`` consecutive rollouts.
            eps (Tensor): standard normals ``[H, M, A]``.

        Returns:
            actions ``[H, M, A]`` (what ``policy(z_t, eps=eps[t])[0]`` along ``next`` gives, row by row).
        """
        H, M, A = eps.shape
        R = z0.shape[0]
        mean, log_std = self.policy_params(z0)  # the prior at z0 once per start latent
        a = self._sample_action(mean.unsqueeze(1), eps[0].view(R, M // R, A), log_std.exp().unsqueeze(1))
        acts = [a.view(M, A)]
        z = self._spread(z0, M)
        for t in range(1, H):
            z = self._dyn.rest(self._dyn.first(z, acts[-1]))
            acts.append(self.policy_action(z, eps[t]))
        return torch.stack(acts)

    def imagine(self, z0: torch.Tensor, actions: torch.Tensor, terminal_eps: torch.Tensor | None,
                weights: torch.Tensor, uncertainty: bool = False):
        """The planners' objective (see :meth:`LatentPlannerBase.imagine`) for non-episodic models, fused:
        ``z0`` is ``[R, L]`` with each latent shared by ``M / R`` consecutive rows of ``actions`` ``[H, M, A]``;
        ``weights`` are the discounts ``[H+1, 1, 1]``. Returns ``NotImplemented`` for episodic models."""
        if self._term is not None:
            return NotImplemented
        H, M, A = actions.shape
        L = z0.shape[-1]
        dyn, rew = self._dyn, self._rew
        z0 = self._spread(z0, M)
        z, zs = z0, []
        if M >= _SHARED_ROWS_FROM:
            # Many rows: the reward of each step right after its dynamics step, while z_t is in cache (a pass over
            # all H·M rows at once moves tensors larger than the L2 cache through memory several times).
            rewards = []
            for t in range(H):
                rewards.append(self.decode(rew.rest(rew.first(z, actions[t]))))
                z = dyn.rest(dyn.first(z, actions[t]))
                zs.append(z)
            rewards = torch.stack(rewards)  # [H, M, 1]
        else:
            # Few rows: the rewards of the whole horizon in one pass (fewer, larger products).
            for t in range(H):
                z = dyn.rest(dyn.first(z, actions[t]))
                zs.append(z)
            hr = rew.first(torch.stack([z0, *zs[:-1]]).view(H * M, L), actions.reshape(H * M, A))
            rewards = self.decode(rew.rest(hr)).view(H, M, 1)
        if uncertainty and z0.shape[0] != M:
            z0 = z0.repeat_interleave(M // z0.shape[0], 0)
        q_H, u = self.trajectory_values([z0, *zs], actions, terminal_eps, uncertainty)
        unc = None if u is None else u.sum(0)
        # Σ_t γ^t r_t + γ^H v_H as one [1, H+1] @ [H+1, M] product.
        ret = (weights.view(1, H + 1) @ torch.cat([rewards, q_H.unsqueeze(0)]).view(H + 1, M)).view(M, 1)
        return ret, unc


class BMPCPlanningOps(TDMPC2PlanningOps):
    """The tensor methods of a :class:`~torchrl_dreammpc.modules.BMPCWorldModel` (eval mode), as
    :class:`TDMPC2PlanningOps` computes TD-MPC2's: the V ensemble on latents (no action columns), BMPC's prior
    (``mean = tanh(raw)``, samples ``clip(mean + σ ε, -1, 1)``, log σ in the acting or, with ``explore``, the
    exploration range), ``value(z, a) = r̂(z, a) + γ V(next(z, a))`` and the planners' objective with ``V̄(z_H)``.
    Get it with :meth:`BMPCWorldModel.planning_ops`, which sets :attr:`explore` from the model's
    :meth:`~BMPCWorldModel.exploration_prior` state.
    """

    def __init__(self, wm):
        super().__init__(wm)
        cfg = wm.config
        self.discount = wm.discount
        self.explore = False
        dtype, device = self._bins.dtype, self._bins.device
        self._ranges = {}
        for explore, (lo, hi) in ((False, (cfg.log_std_min, cfg.log_std_max)),
                                  (True, (cfg.expl_log_std_min, cfg.expl_log_std_max))):
            self._ranges[explore] = (0.5 * (hi - lo), torch.tensor(lo + 0.5 * (hi - lo), dtype=dtype, device=device))

    def policy_params(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._pi(z)
        A = self.action_dim
        scale, shift = self._ranges[self.explore]
        return torch.tanh(out[..., :A]), torch.add(shift, torch.tanh(out[..., A:]), alpha=scale)

    def _mean_action(self, mean: torch.Tensor) -> torch.Tensor:
        return mean  # already tanh-ed

    def _sample_action(self, mean: torch.Tensor, eps: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(mean, eps, std).clamp_(-1.0, 1.0)

    def v_logits(self, z: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        return self._q(z, None, members)

    def state_value(self, z: torch.Tensor, eps: torch.Tensor | None = None, reduce: str = "avg") -> torch.Tensor:
        if reduce == "all":
            return self.decode(self._q(z, None))
        if reduce not in ("avg", "min"):
            raise ValueError(f"reduce must be 'all', 'avg' or 'min', got {reduce!r}")
        idx = self._two_random_heads(z.device)
        if idx is None:
            v = self.decode(self._q(z, None))
        elif _HOST_PAIR and idx.device.type == "cpu" and not torch.compiler.is_compiling():
            v = self.decode(self._q.some(z, None, idx.tolist()))
        else:
            v = self.decode(self._q(z, None, members=idx))
        return v.amin(0) if reduce == "min" else v.mean(0)

    def value(self, z: torch.Tensor, a: torch.Tensor, reduce: str = "avg") -> torch.Tensor:
        return self.reward(z, a) + self.discount * self.state_value(self.next(z, a), reduce=reduce)

    def value_and_disagreement(self, z: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.value(z, a, reduce="all")
        idx = self._two_random_heads(z.device)
        std, mean = torch.std_mean(q, 0)
        return (mean if idx is None else q.index_select(0, idx).mean(0)), mean * std

    def value_disagreement(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        std, mean = torch.std_mean(self.value(z, a, reduce="all"), 0)
        return mean * std

    def trajectory_values(self, zs, actions: torch.Tensor, terminal_eps: torch.Tensor | None = None,
                          uncertainty: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """BMPC's ``V̄(z_H)`` and, with ``uncertainty``, ``mean_k V_k · std_k V_k`` at ``z_0 .. z_H`` (see
        :meth:`BMPCWorldModel.trajectory_values`)."""
        if not uncertainty:
            return self.state_value(zs[-1]), None
        v = self.decode(self._q(_stacked(zs), None))  # [K, H+1, M, 1]
        idx = self._two_random_heads(v.device)
        v_H = (v[:, -1] if idx is None else v.index_select(0, idx)[:, -1]).mean(0)
        std, mean = torch.std_mean(v, 0)
        return v_H, mean * std
