"""Two-hot discrete regression in symlog space, as TD-MPC2 uses it for rewards and values.

TD-MPC2 places ``num_bins`` bins uniformly in *symlog* space on ``[vmin, vmax]`` (101 bins on [-10, 10]),
encodes a scalar ``x`` as the two-hot vector of ``symlog(x)`` and decodes logits as
``symexp(E_softmax[bins])``. TorchRL's ``two_hot_encode`` / ``two_hot_cross_entropy`` interpolate linearly on
whatever support they are given, so calling them with the symlog-space support and ``symlog(x)`` gives exactly
TD-MPC2's encoding (tests/test_world_model.py checks this). Decoding is ``symexp`` of TorchRL's
``two_hot_decode`` on the same support. (TorchRL's ``SymExpTwoHot`` itself is DreamerV3's variant: support in
raw-value space, expectation in raw space, which is a different estimator, so it is not used.)
"""
from __future__ import annotations

import torch
from torch import nn
from torchrl.modules.functional import symexp, symlog
from torchrl.modules.models.model_based import two_hot_cross_entropy, two_hot_encode

__all__ = ["SymlogTwoHot"]


class SymlogTwoHot(nn.Module):
    """Symlog-space two-hot encoder/decoder.

    Args:
        num_bins (int): number of bins (TD-MPC2: 101).
        vmin (float): lowest bin in symlog space (TD-MPC2: -10).
        vmax (float): highest bin in symlog space (TD-MPC2: 10).

    Examples:
        >>> th = SymlogTwoHot()
        >>> x = torch.tensor([[-3.0], [0.5], [12.0]])
        >>> torch.allclose(th.decode(th.encode(x).clamp_min(1e-12).log()), x, rtol=1e-4)
        True
    """

    def __init__(self, num_bins: int = 101, vmin: float = -10.0, vmax: float = 10.0):
        super().__init__()
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        self.num_bins, self.vmin, self.vmax = num_bins, vmin, vmax
        self.register_buffer("bins", torch.linspace(vmin, vmax, num_bins), persistent=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Scalars ``[..., 1]`` → two-hot targets ``[..., num_bins]``."""
        return two_hot_encode(symlog(x.squeeze(-1)), self.bins)

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., num_bins]`` → scalars ``[..., 1]``.

        ``softmax(logits) @ bins`` as one matrix-vector product: it is the same expectation as TorchRL's
        ``two_hot_decode`` (which pairs mirrored bins to make uniform logits decode to exactly 0), but one kernel
        instead of six, and decoding sits in the planners' hot loop.
        """
        return symexp(torch.softmax(logits, dim=-1) @ self.bins.unsqueeze(-1))

    def cross_entropy(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Soft cross-entropy of logits ``[..., num_bins]`` against scalar targets ``[..., 1]`` → ``[...]``."""
        return two_hot_cross_entropy(logits, symlog(x.squeeze(-1)), self.bins)
