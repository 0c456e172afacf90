"""Small named building blocks of the TD-MPC2 family: ``mlp``, ``SimNorm``, ``NormedLinear``, ``EnsembleMLP``.

Architecture facts (LayerNorm + Mish hidden layers, SimNorm with groups of 8, dropout on the first Q layer,
truncated-normal init with std 0.02) follow the TD-MPC2 paper (Hansen et al., 2024) and its public code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SimNorm", "NormedLinear", "mlp", "EnsembleMLP", "weight_init", "mish", "Mish", "dropout", "dropout_mask"]


# On a CPU, from this many elements Mish runs in its sigmoid form (ATen's mish kernel evaluates tanh, log1p and
# exp per element: ~2.5-4 ns each on these CPUs, a quarter of an eager 1M-model update; docs/performance.md)...
_FAST_MISH_FROM = 4096
# ... and, under autograd, from this many (a custom autograd function: its Python overhead pays from ~20 rows).
_FAST_MISH_GRAD_FROM = 8192


def _mish_parts(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mish(h), t, s)`` with ``t = tanh(softplus(h)) = n/(2-n)``, ``n = s(2-s)``, ``s = sigmoid(h)`` (exact
    algebra: ``tanh(softplus(x)) = ((1+eˣ)² - 1)/((1+eˣ)² + 1)``): one transcendental instead of ATen's three
    (|difference to ATen| < 2e-6)."""
    s = torch.sigmoid(h)
    t = torch.rsub(s, 2.0).mul_(s)  # n = s (2 - s)
    d = torch.rsub(t, 2.0)  # 2 - n
    t.div_(d)
    return h * t, t, s


class _FastMish(torch.autograd.Function):
    """Mish in the sigmoid form, with the backward ``g · (t + x·s·(1-s)²·(1+t)²)``: ``1 - t² = (1-s)²(1+t)²``
    (no cancellation where ``t → 1``)."""

    @staticmethod
    def forward(ctx, h):
        y, t, s = _mish_parts(h)
        ctx.save_for_backward(h, t, s)
        return y

    @staticmethod
    def backward(ctx, g):
        h, t, s = ctx.saved_tensors
        v = torch.add(t, 1.0).mul_(torch.rsub(s, 1.0)).square_()  # (1+t)²(1-s)² = 1 - t²
        return v.mul_(s).mul_(h).add_(t).mul_(g)


def mish(x: torch.Tensor) -> torch.Tensor:
    """Mish, ``x * tanh(softplus(x))``, the activation of every hidden layer (world model and planners).

    - Under ``torch.compile``: written with a single ``exp``, ``tanh(log1p(e)) = n / (n + 2)`` with
      ``n = e (e + 2)``, ``e = exp(x)``, which inductor fuses with the surrounding LayerNorm into one memory pass.
    - Eager, on a CPU, for tensors of ``_FAST_MISH_FROM`` elements or more (``_FAST_MISH_GRAD_FROM`` under
      autograd): the sigmoid form (:func:`_mish_parts`; in place without autograd, :class:`_FastMish` with its
      closed-form backward under it), 2-4x faster than ATen's kernel on these CPUs.
    - Otherwise ``F.mish`` (one kernel: the cheapest for a few rows, and the GPU kernel).

    All forms agree with ``F.mish`` up to float rounding (|diff| < 2e-6, tests/test_speed.py); for x > 20,
    mish(x) = x in float32.
    """
    if torch.compiler.is_compiling():
        e = torch.exp(torch.clamp(x, max=20.0))
        n = e * (e + 2)
        return torch.where(x > 20.0, x, x * n / (n + 2))
    grad = x.requires_grad and torch.is_grad_enabled()
    if x.device.type != "cpu" or x.numel() < (_FAST_MISH_GRAD_FROM if grad else _FAST_MISH_FROM):
        return F.mish(x)
    if grad:
        return _FastMish.apply(x)
    s = torch.sigmoid(x)
    d = torch.rsub(s, 2.0)  # 2 - s
    s.mul_(d)  # n = s (2 - s)
    torch.neg(s, out=d).add_(2.0)  # 2 - n
    return s.mul_(x).div_(d)


def _drop_positions(numel: int, p: float, device: torch.device) -> torch.Tensor:
    """Flat indices of the dropped elements of a Bernoulli(p) mask over ``numel`` elements.

    The dropped positions of i.i.d. Bernoulli(p) trials are a Bernoulli process: the gaps between consecutive
    drops are i.i.d. Geometric(p) on {1, 2, ...}. Drawing ~``numel * p`` gaps instead of ``numel`` uniforms is
    what makes TD-MPC2's small dropout (p = 0.01) cheap; the distribution of the mask is exactly Bernoulli's.
    """
    draws = int(numel * p + 6.0 * (numel * p) ** 0.5 + 16)
    ends, chunks = 0, []
    while ends < numel:  # a second draw happens with probability ~1e-9
        gaps = torch.empty(draws, dtype=torch.float64, device=device).geometric_(p).long()
        pos = gaps.cumsum(0) + (ends - 1)
        chunks.append(pos)
        ends = int(pos[-1]) + 1
    pos = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    return pos[pos < numel]


@torch.library.custom_op("torchrl_dreammpc::dropout_mask", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted-dropout mask shaped like ``like``: 0 with probability ``p``, else ``1 / (1 - p)``.

    A custom op so that ``torch.compile`` calls it as one opaque kernel and fuses only the multiply: inductor's
    own CPU dropout draws a Philox number per element and cost ~20 % of a compiled 1M-model update (profiled in
    docs/performance.md); this draws ~``p * numel`` geometric gaps (see ``_drop_positions``). It uses torch's
    global generator, so eager and compiled runs consume the same random stream. Tagged nondeterministic-seeded,
    so the compiler neither merges two calls nor recomputes one in the backward pass.
    """
    mask = torch.full(like.shape, 1.0 / (1.0 - p), dtype=like.dtype, device=like.device)
    mask.view(-1)[_drop_positions(like.numel(), p, like.device)] = 0.0
    return mask


@dropout_mask.register_fake
def _(like, p):
    return torch.empty_like(like, memory_format=torch.contiguous_format)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout`` with the same distribution; on a CPU drawn with :func:`dropout_mask` (fast for small ``p``).
    Other devices keep ``F.dropout``: their RNG kernels are fast, and the gap walk would sync the device."""
    if not training or p == 0.0:
        return x
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    return x * dropout_mask(x.detach(), p)


class Mish(nn.Module):
    """Module form of :func:`mish`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish(x)


class SimNorm(nn.Module):
    """Simplicial normalization: a softmax over consecutive groups of ``group_size`` features.

    Each group of the output lies on a simplex (non-negative, sums to one), which bounds the latent state and
    keeps the latent dynamics well conditioned (TD-MPC2, Sec. 3).

    Args:
        group_size (int): number of features per group (TD-MPC2: 8).

    Examples:
        >>> z = SimNorm(8)(torch.randn(3, 16))
        >>> torch.allclose(z.view(3, 2, 8).sum(-1), torch.ones(3, 2))
        True
    """

    def __init__(self, group_size: int = 8):
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.group_size:
            raise ValueError(f"SimNorm: feature size {x.shape[-1]} is not a multiple of {self.group_size}.")
        shape = x.shape
        return F.softmax(x.unflatten(-1, (-1, self.group_size)), dim=-1).view(shape)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


class NormedLinear(nn.Linear):
    """``Linear → (Dropout) → LayerNorm → activation`` (Mish unless another activation is given)."""

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0, act: nn.Module | None = None):
        super().__init__(in_features, out_features)
        self.ln = nn.LayerNorm(out_features)
        self.act = act if act is not None else Mish()
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.dropout:
            x = dropout(x, self.dropout, self.training)
        return self.act(self.ln(x))


def mlp(in_dim: int, hidden_dims: list[int], out_dim: int, out_act: nn.Module | None = None,
        dropout: float = 0.0) -> nn.Sequential:
    """TD-MPC2's basic block: NormedLinear hidden layers, then a plain Linear (or a NormedLinear with
    ``out_act``, e.g. SimNorm, when the output is a latent state). Dropout only on the first layer."""
    dims = [in_dim, *hidden_dims, out_dim]
    layers: list[nn.Module] = [
        NormedLinear(dims[i], dims[i + 1], dropout=dropout if i == 0 else 0.0) for i in range(len(dims) - 2)
    ]
    layers.append(NormedLinear(dims[-2], dims[-1], act=out_act) if out_act is not None else nn.Linear(dims[-2], dims[-1]))
    return nn.Sequential(*layers)


def weight_init(m: nn.Module) -> None:
    """TD-MPC2's init: truncated normal (std 0.02) weights and zero biases for linear layers."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class EnsembleMLP(nn.Module):
    """An ensemble of ``num_members`` identical MLPs (the TD-MPC2 Q heads) with stacked weights.

    Every layer of every member runs as ONE batched matrix product (``baddbmm`` over the member dimension), so
    the whole ensemble costs as many kernel launches as a single head. The first layer's input is shared by all
    members, so it is computed as one ``[N, in] @ [in, K*hidden]`` product.

    Weights are stored in ``nn.Linear`` layout (``weight_i``: ``[K, out, in]``, ``bias_i``: ``[K, out]``,
    ``ln_weight_i`` / ``ln_bias_i`` for hidden layers), which keeps checkpoint conversion a plain reshaping.
    With ``trainable=False`` the same tensors are buffers: that is how target networks are held (they appear in
    ``state_dict`` but never in ``parameters()``).

    Args:
        num_members (int): ensemble size K.
        in_dim (int): input features (shared by every member).
        hidden_dims (list of int): hidden layer widths.
        out_dim (int): output features per member.
        dropout (float): dropout on the first hidden layer (TD-MPC2: 0.01).
        trainable (bool): parameters (True) or buffers (False).

    Examples:
        >>> q = EnsembleMLP(5, 10, [32, 32], 101)
        >>> q(torch.randn(7, 10)).shape
        torch.Size([5, 7, 101])
    """

    def __init__(self, num_members: int, in_dim: int, hidden_dims: list[int], out_dim: int,
                 dropout: float = 0.0, trainable: bool = True):
        super().__init__()
        self.num_members, self.in_dim, self.out_dim = num_members, in_dim, out_dim
        self.dims = [in_dim, *hidden_dims, out_dim]
        self.num_layers = len(self.dims) - 1
        self.dropout = dropout
        self.trainable = trainable
        register = (lambda n, t: self.register_parameter(n, nn.Parameter(t))) if trainable else self.register_buffer
        for i in range(self.num_layers):
            register(f"weight_{i}", torch.empty(num_members, self.dims[i + 1], self.dims[i]))
            register(f"bias_{i}", torch.zeros(num_members, self.dims[i + 1]))
            if i < self.num_layers - 1:
                register(f"ln_weight_{i}", torch.ones(num_members, self.dims[i + 1]))
                register(f"ln_bias_{i}", torch.zeros(num_members, self.dims[i + 1]))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for i in range(self.num_layers):
            nn.init.trunc_normal_(getattr(self, f"weight_{i}"), std=0.02)
            getattr(self, f"bias_{i}").zero_()
            if i < self.num_layers - 1:
                getattr(self, f"ln_weight_{i}").fill_(1.0)
                getattr(self, f"ln_bias_{i}").zero_()

    def layer_tensors(self, detach: bool = False) -> list[tuple[torch.Tensor, ...]]:
        """Per layer: (weight, bias, ln_weight, ln_bias) (the last layer has no LayerNorm)."""
        out = []
        for i in range(self.num_layers):
            names = [f"weight_{i}", f"bias_{i}"]
            if i < self.num_layers - 1:
                names += [f"ln_weight_{i}", f"ln_bias_{i}"]
            ts = tuple(getattr(self, n) for n in names)
            out.append(tuple(t.detach() for t in ts) if detach else ts)
        return out

    def forward(self, x: torch.Tensor, detach_params: bool = False, members: torch.Tensor | None = None) -> torch.Tensor:
        """Evaluate the members on a shared input.

        Args:
            x (Tensor): input of shape ``[*batch, in_dim]``.
            detach_params (bool): use the weights without gradient (gradients still flow to ``x``), as the
                policy loss and the planners need.
            members (Tensor, optional): indices of the members to evaluate (default: all).

        Returns:
            a tensor of shape ``[K, *batch, out_dim]`` (K = number of evaluated members).
        """
        batch_shape = x.shape[:-1]
        h = x.reshape(1, -1, x.shape[-1])  # [1, N, in]
        layers = self.layer_tensors(detach=detach_params)
        for i, ts in enumerate(layers):
            if members is not None:
                ts = tuple(t[members] for t in ts)
            w, b = ts[0], ts[1]
            k = w.shape[0]
            if i == 0:
                # Shared input: one [N, in] x [in, K*out] product for all members.
                h = torch.addmm(b.reshape(1, -1), h[0], w.reshape(-1, w.shape[-1]).t())
                h = h.view(h.shape[0], k, -1).transpose(0, 1)  # [K, N, out]
            else:
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if i < self.num_layers - 1:
                if i == 0 and self.dropout and self.training:
                    h = dropout(h, self.dropout)
                h = F.layer_norm(h, (h.shape[-1],)) * ts[2].unsqueeze(1) + ts[3].unsqueeze(1)
                h = mish(h)
        return h.reshape(h.shape[0], *batch_shape, h.shape[-1])

    def extra_repr(self) -> str:
        return f"members={self.num_members}, dims={self.dims}, dropout={self.dropout}, trainable={self.trainable}"


def param_count(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

