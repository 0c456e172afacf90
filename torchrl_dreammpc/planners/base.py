"""The shared base of the latent-space planners: :class:`LatentPlannerBase`.

Why not :class:`torchrl.modules.planners.MPCPlannerBase`? It plans through a TorchRL *environment*: every imagined
step is an ``env.step`` on a tensordict (``env.rollout`` with a precomputed-action policy, then an advantage
module on the rollout tensordict), the action spec of that env projects the result, and it has no notion of
per-env warm-start state, of a policy prior, of value ensembles or of gradients w.r.t. the actions. Our planners
call the world model's tensor methods directly (:class:`~torchrl_dreammpc.modules.WorldModelBase`): one Dream-MPC
control step is ~30 network calls on a handful of rows, so the tensordict bookkeeping of ``MPCPlannerBase``
(allocating, cloning and stepping a tensordict per imagined step) would cost more than the planning itself. We keep
what matters from it for the user: a :class:`~tensordict.nn.TensorDictModuleBase` with explicit ``in_keys`` /
``out_keys`` that reads ``"observation"``, writes ``"action"`` and drops into ``env.rollout`` and the collectors.
"""
from __future__ import annotations

import abc
import contextlib
import functools
import math
import types

import torch
from tensordict import NestedKey, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.envs.utils import ExplorationType, exploration_type

from torchrl_dreammpc._checks import check_bool as _check_bool
from torchrl_dreammpc._checks import check_compile as _check_compile
from torchrl_dreammpc._checks import check_float as _check_float
from torchrl_dreammpc._checks import check_int as _check_int
from torchrl_dreammpc.modules.base import WorldModelBase, state_action_trajectory_values

__all__ = ["LatentPlannerBase", "NonFiniteActionError"]

# Exploration types that mean "act for data collection". ``None`` (no context manager, e.g. a bare
# ``env.rollout``) counts as exploration, like TorchRL's collectors (their default is RANDOM).
_EXPLORING = (ExplorationType.RANDOM, None)


class NonFiniteActionError(ValueError):
    """A planner was about to return a NaN/inf action; the message names the cause (the observation, a world-model
    weight, or the planning itself)."""


def _imagine(ops, z0: torch.Tensor, actions: torch.Tensor, terminal_eps: torch.Tensor | None,
             weights: torch.Tensor, uncertainty: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:meth:`LatentPlannerBase.imagine` on the planning ops of a model (``weights``: discounts ``[H+1, 1, 1]``)."""
    H, M = actions.shape[0], actions.shape[1]
    fused = getattr(ops, "imagine", None)
    if fused is not None:
        out = fused(z0, actions, terminal_eps, weights, uncertainty=uncertainty)
        if out is not NotImplemented:
            return out
    if z0.shape[0] != M:
        z0 = z0.repeat_interleave(M // z0.shape[0], 0)
    z = z0
    zs = [z0]
    for t in range(H):
        z = ops.next(z, actions[t])
        zs.append(z)
    zs = torch.stack(zs)  # [H+1, M, L]
    rewards = ops.reward(zs[:-1], actions)  # [H, M, 1]
    term = ops.termination(zs[1:])
    alive = None
    if term is not None:
        ended = (term > 0.5).to(z0.dtype).cumsum(0).clamp(max=1.0)  # [H, M, 1]: ended at or before z_{t+1}
        alive = 1.0 - torch.cat([torch.zeros_like(ended[:1]), ended])  # [H+1, M, 1]
        weights = weights * alive
    # The terminal value and the per-step disagreement: the model family decides how (Q(z_H, π(z_H)) for
    # state-action models, V(z_H) for state-value models); planning ops without the method are state-action.
    values = getattr(ops, "trajectory_values", None)
    if values is None:
        values = functools.partial(state_action_trajectory_values, ops)
    q_H, u = values(zs, actions, terminal_eps, uncertainty)
    unc = None if u is None else ((u * alive).sum(0) if alive is not None else u.sum(0))
    ret = (weights[:-1] * rewards).sum(0) + weights[-1] * q_H
    return ret, unc


def _rollout_prior(ops, z0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """:meth:`LatentPlannerBase.rollout_prior` on the planning ops of a model."""
    fused = getattr(ops, "rollout_policy", None)
    if fused is not None:
        return fused(z0, eps)
    H, M = eps.shape[0], eps.shape[1]
    z = z0 if z0.shape[0] == M else z0.repeat_interleave(M // z0.shape[0], 0)
    acts = []
    for t in range(H):
        acts.append(_policy_action(ops, z, eps[t]))
        if t < H - 1:
            z = ops.next(z, acts[-1])
    return torch.stack(acts)


def _policy_action(ops, z: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
    """The prior's action at ``z``: a sample with the given standard-normal ``eps``, or its mean for ``None``."""
    fast = getattr(ops, "policy_action", None)
    if fast is not None:
        return fast(z, eps)
    return ops.policy(z, deterministic=True)[0] if eps is None else ops.policy(z, eps=eps)[0]


class LatentPlannerBase(TensorDictModuleBase, abc.ABC):
    """Base class of the actors that act by planning in a latent world model.

    It owns everything the planners share: encoding the observation, the imagined objective
    (:meth:`imagine`), action bounds, the per-env warm-start state, batched / unbatched inputs, the exploration
    type, the sampling noise (:meth:`draw_noise`) and the optional diagnostics. A subclass implements
    :meth:`plan` (``z0 [B, L] → action [B, A]``) and declares :attr:`noise_per_env`.

    Batching: an observation ``[*batch, obs_dim]`` is flattened to ``[B, obs_dim]`` (an unbatched ``[obs_dim]``
    is ``B = 1``); the action is written back as ``[*batch, action_dim]``. Each of the ``B`` environments keeps
    its own warm-start state; the state is dropped when ``B`` (or the device) changes.

    Episode boundaries: if ``is_init_key`` (``"is_init"``, written by TorchRL's
    :class:`~torchrl.envs.transforms.InitTracker`) is in the input, the warm start of every env whose flag is
    ``True`` is reset before planning. If it is absent, the warm start carries over from call to call; call
    :meth:`reset` at episode boundaries yourself (or add an ``InitTracker`` to the env).

    Noise: all the randomness of one control step is one ``[B, noise_per_env]`` draw of standard normals
    (:meth:`draw_noise`), env-major. With a ``generator`` it is drawn so that env ``b`` of a batched call gets
    exactly the numbers that the ``b``-th of ``B`` successive single-env calls on the same generator gets:
    batched and single-env planning then agree. (Randomness *inside* the world model, e.g. TD-MPC2's random pair
    of Q heads for ``reduce="avg"`` or dropout in train mode, is not covered: use ``num_q=2`` and ``eval()`` for
    exact reproducibility.)

    Args:
        world_model (WorldModelBase): the latent model; only its :class:`WorldModelBase` methods are used. Its
            parameters are never updated (gradients are taken w.r.t. the actions only). Keep it in ``eval()``
            mode while acting, as TD-MPC2 does, unless you want dropout noise in the Q heads.

    Keyword Args:
        action_spec (TensorSpec, optional): a bounded TorchRL action spec (or a Composite holding
            ``action_key``); its ``low`` / ``high`` are the action bounds.
        low, high (float or Tensor, optional): action bounds when no spec is given. Default ``[-1, 1]``
            (the policy prior is tanh-squashed into [-1, 1], as in TD-MPC2).
        observation_key (NestedKey): input key. Default ``"observation"``.
        latent_key (NestedKey, optional): read the latent itself from this entry instead of encoding the
            observation (``encode`` is then not called). Defaults to the world model's ``latent_key``: ``None``
            for models that encode one observation (TD-MPC2), the state estimator's output for recurrent models
            (DreamerV3, see :meth:`~torchrl_dreammpc.modules.WorldModelBase.acting_module`).
        action_key (NestedKey): output key. Default ``"action"``.
        is_init_key (NestedKey): episode-start flags. Default ``"is_init"``.
        diagnostics (bool): also write ``("planner", ...)`` entries (see the subclass). Default ``False``.
        generator (torch.Generator, optional): the RNG of the planning noise (on any device: the noise is drawn
            there, then moved to the model's).
        check_finite (bool or None): refuse to return a NaN/inf action, or to plan from a NaN/inf observation,
            with a :class:`NonFiniteActionError` naming the cause (the observation, a non-finite world-model
            weight, or the planning itself). Checked once per step, after planning: the observation, the action
            and the executed plan's score, one host read. ``None`` (default): checked whenever the observation lives on the CPU (a CPU model,
            or a CUDA model acting in a CPU simulator, whose action is copied to the host anyway: the check then
            only adds a scalar read after that copy's synchronization; 18 µs per step measured on a loaded 2-core
            CPU, docs/planners.md); skipped for CUDA observations (an env on the GPU), where it would add a host
            sync per step. ``True``: always; ``False``: never.
        expert_key (NestedKey, optional): also write the planner's action distribution at the current state, the
            "expert" that BMPC's policy imitates: ``(expert_key, "loc")`` and ``(expert_key, "scale")``, each
            ``[*batch, action_dim]`` (what each planner writes is in its docstring; :class:`PolicyActor` writes
            none). Default ``None``: not written.
        compile (bool or str): ``torch.compile`` the model evaluations of a control step (:meth:`imagine` and
            :meth:`rollout_prior`; their backward too, through AOTAutograd). A string is the compile mode (checked
            here). The first call of each new batch size compiles (docs/performance.md, *Compile time*; the same
            file says when it pays). Default ``False`` (eager). Randomness inside the model (the random pair of Q heads of TD-MPC2's
            ``"avg"`` with more than two heads) then comes from the compiled RNG stream.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl_dreammpc.modules import TDMPC2WorldModel
        >>> class OneStepGreedy(LatentPlannerBase):  # best of 8 random actions by the imagined 1-step objective
        ...     noise_per_env = 8
        ...     def plan(self, z0, warm, explore):
        ...         B = z0.shape[0]
        ...         a = self.clamp_action(torch.rand(1, B * 8, self.action_dim) * 2 - 1)
        ...         ret, _ = self.imagine(z0.repeat_interleave(8, 0), a, None)
        ...         best = ret.view(B, 8).argmax(1)
        ...         return a[0].view(B, 8, -1)[torch.arange(B), best], {}
        >>> wm = TDMPC2WorldModel(5, 2, model_size=1, enc_dim=32, mlp_dim=32, latent_dim=16)
        >>> OneStepGreedy(wm)(TensorDict({"observation": torch.randn(4, 5)}, [4]))["action"].shape
        torch.Size([4, 2])
    """

    #: sub-key under which diagnostics are written: ``("planner", name)``.
    diagnostics_key = "planner"
    #: whether :meth:`plan` produces an expert distribution (written under ``expert_key`` when one is given).
    writes_expert = True

    def __init__(
        self,
        world_model: WorldModelBase,
        *,
        action_spec=None,
        low: float | torch.Tensor | None = None,
        high: float | torch.Tensor | None = None,
        observation_key: NestedKey = "observation",
        latent_key: NestedKey | None = None,
        action_key: NestedKey = "action",
        is_init_key: NestedKey = "is_init",
        diagnostics: bool = False,
        generator: torch.Generator | None = None,
        check_finite: bool | None = None,
        compile: bool | str = False,
        expert_key: NestedKey | None = None,
    ):
        super().__init__()
        if not isinstance(world_model, WorldModelBase):
            raise TypeError(f"world_model must be a WorldModelBase, got {type(world_model).__name__}.")
        self.world_model = world_model
        self.action_dim = _check_int("world_model.action_dim", world_model.action_dim, 1)
        self.observation_key, self.action_key, self.is_init_key = observation_key, action_key, is_init_key
        self.latent_key = latent_key if latent_key is not None else getattr(world_model, "latent_key", None)
        self.in_keys = [observation_key if self.latent_key is None else self.latent_key, is_init_key]
        self.out_keys = [action_key]
        self.expert_key = expert_key
        if expert_key is not None and self.writes_expert:
            self.out_keys += [self._expert_entry("loc"), self._expert_entry("scale")]
        self.diagnostics = _check_bool("diagnostics", diagnostics)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}.")
        self.generator = generator
        self.check_finite = None if check_finite is None else _check_bool("check_finite", check_finite)
        self.compile_mode = _check_compile("compile", compile)  # (not ``self.compile``: that is nn.Module's method)
        self._compiled: dict = {}
        # The model's planning ops, fetched once per forward call. Kept out of nn.Module's registry: in train()
        # mode the ops are the model itself, which assigning as an attribute would register as a submodule (and a
        # later non-module assignment would then be refused).
        self.__dict__["_step_ops"] = None
        low_t, high_t = self._resolve_bounds(action_spec, low, high)
        # Buffers so that ``planner.to(device)`` moves them; non-persistent: they are configuration.
        self.register_buffer("action_low", low_t, persistent=False)
        self.register_buffer("action_high", high_t, persistent=False)
        self._discount_cache: tuple | None = None
        # The executed plan's objective ([B, 1]) a subclass may set in ``plan``: included in the finiteness check.
        self._objective: torch.Tensor | None = None
        self._clear_state()

    # ------------------------------------------------------------------ configuration helpers
    def _resolve_bounds(self, action_spec, low, high) -> tuple[torch.Tensor, torch.Tensor]:
        A = self.action_dim
        if action_spec is not None:
            if low is not None or high is not None:
                raise ValueError("Pass either action_spec or low/high, not both.")
            if hasattr(action_spec, "keys") and self.action_key in action_spec.keys(True, True):
                action_spec = action_spec[self.action_key]
            space = getattr(action_spec, "space", None)
            if space is None or not hasattr(space, "low"):
                raise ValueError(f"action_spec must be a bounded spec with low/high, got {type(action_spec).__name__}.")
            low, high = space.low, space.high
        bounds = []
        for name, value, default in (("low", low, -1.0), ("high", high, 1.0)):
            t = torch.as_tensor(default if value is None else value, dtype=torch.float32).detach().clone()
            t = t.reshape(-1, t.shape[-1])[0] if t.ndim > 1 else t  # batched-env specs: the bounds of one env
            t = t.expand(A).clone() if t.numel() == 1 else t
            if t.shape != (A,):
                raise ValueError(f"action bounds must have {A} entries (world_model.action_dim), got {name} of "
                                 f"shape {tuple(t.shape)}.")
            # TorchRL's Unbounded specs report +-float32 max: refuse them rather than plan in an unbounded box.
            if not torch.isfinite(t).all() or (t.abs() > 1e30).any():
                raise ValueError(f"action bounds must be finite, got {name}={t.tolist()}; an unbounded action spec "
                                 "needs explicit low/high.")
            bounds.append(t)
        low, high = bounds
        if not (low < high).all():
            raise ValueError(f"action bounds need low < high, got low={low.tolist()}, high={high.tolist()}.")
        return low, high

    # ------------------------------------------------------------------ state
    def _clear_state(self) -> None:
        self._state_batch: int | None = None
        self._state_device: torch.device | None = None
        self._has_prev: torch.Tensor | None = None  # [B] bool: env has a previous plan to warm-start from
        self._prev: torch.Tensor | None = None  # the subclass's warm-start tensor (see ``last_plan``)

    def reset(self, env_mask: torch.Tensor | None = None) -> None:
        """Forget the warm start: of every env (``env_mask=None``) or of the envs where ``env_mask`` (``[B]`` bool,
        over the flattened batch) is ``True``. The next call plans those envs from the policy prior alone."""
        if env_mask is None or self._has_prev is None:
            self._clear_state()
            return
        env_mask = torch.as_tensor(env_mask, device=self._has_prev.device, dtype=torch.bool).reshape(-1)
        if env_mask.shape != self._has_prev.shape:
            raise ValueError(f"env_mask has {env_mask.numel()} entries but the planner holds state for "
                             f"{self._has_prev.numel()} envs.")
        self._has_prev = self._has_prev & ~env_mask

    @contextlib.contextmanager
    def separate_warm_start(self):
        """Plans inside the block from a warm start of their own, and puts this planner's back on exit.

        For one planner instance that acts in two places, e.g. a training run's planner evaluated between two
        training steps: the evaluation's episodes start from no previous plan, and the training episode in
        progress goes on from its own previous plan, not from the evaluation's last one.

        Examples:
            >>> import torch
            >>> from tensordict import TensorDict
            >>> from torchrl_dreammpc.modules import TDMPC2WorldModel
            >>> from torchrl_dreammpc.planners import GradientMPCPlanner
            >>> planner = GradientMPCPlanner(TDMPC2WorldModel(5, 1, enc_dim=16, mlp_dim=16, latent_dim=8))
            >>> _ = planner(TensorDict({"observation": torch.zeros(5)}))
            >>> kept = planner.last_plan
            >>> with planner.separate_warm_start():
            ...     planner.last_plan is None
            ...     _ = planner(TensorDict({"observation": torch.ones(5)}))
            True
            >>> torch.equal(planner.last_plan, kept)
            True
        """
        saved = (self._state_batch, self._state_device, self._has_prev, self._prev)
        self._clear_state()
        try:
            yield self
        finally:
            self._state_batch, self._state_device, self._has_prev, self._prev = saved

    def _expert_entry(self, name: str) -> tuple:
        key = self.expert_key
        return (*key, name) if isinstance(key, tuple) else (key, name)

    @property
    def last_plan(self) -> torch.Tensor | None:
        """The plan kept for the next step's warm start (``None`` before the first call / after :meth:`reset`).
        Its layout is the subclass's (documented there)."""
        return self._prev

    # ------------------------------------------------------------------ shared pieces
    def exploring(self) -> bool:
        """``True`` under ``set_exploration_type(RANDOM)`` or with no exploration type set (collectors default
        to RANDOM); ``False`` under DETERMINISTIC / MODE / MEAN / MEDIAN (evaluation)."""
        return exploration_type() in _EXPLORING

    @property
    @abc.abstractmethod
    def noise_per_env(self) -> int:
        """Standard-normal numbers one control step uses per env."""

    def draw_noise(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """All the standard-normal noise of one control step, ``[batch, noise_per_env]`` (env-major).

        Without a ``generator`` this is one ``torch.randn`` from the global RNG (the fast path). With one, the
        normals are made from uniforms by Box-Muller, row by row: PyTorch's CPU ``randn`` fills tensors of
        different sizes in different orders, ``rand`` does not, so only this way does env ``b`` of a batched call
        get the numbers of the ``b``-th of ``B`` successive single-env calls (exact on CPU; CUDA's counter-based
        RNG gives no such guarantee).
        """
        D = self.noise_per_env
        if self.generator is None:
            return torch.randn(batch, D, device=device, dtype=dtype)
        n = (D + 1) // 2
        # drawn where the generator lives (a CPU generator with a CUDA model: the same numbers, then copied over)
        u = torch.rand(batch, 2 * n, device=self.generator.device, dtype=dtype, generator=self.generator).to(device)
        radius = (-2.0 * torch.log1p(-u[:, :n])).sqrt()  # 1 - u lies in (0, 1]: no log(0)
        angle = (2.0 * math.pi) * u[:, n:]
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :D]

    def _discounts(self, horizon: int, device, dtype) -> torch.Tensor:
        """``γ^t`` for ``t = 0..H`` as ``[H+1, 1, 1]`` (cached: it is rebuilt only if γ, H or the device change)."""
        key = (float(self.world_model.discount), horizon, device, dtype)
        if self._discount_cache is None or self._discount_cache[0] != key:
            disc = key[0] ** torch.arange(horizon + 1, device=device, dtype=torch.float64)
            self._discount_cache = (key, disc.to(dtype).view(-1, 1, 1))
        return self._discount_cache[1]

    def __getstate__(self):
        # Compiled functions and the per-call ops cache are not state (and cannot be pickled): rebuilt on use.
        state = dict(super().__getstate__())
        state["_compiled"], state["_step_ops"] = {}, None
        return state

    def _ops(self):
        """The world model's :meth:`~WorldModelBase.planning_ops` (fetched once per control step)."""
        ops = self._step_ops
        return ops if ops is not None else self.world_model.planning_ops()

    def _check_uncertainty_weight(self, value) -> float:
        """λ of the ensemble-disagreement penalty: >= 0, and > 0 only with at least two value-ensemble members
        (the std of a single head is undefined: NaN would rank every candidate)."""
        value = _check_float("uncertainty_weight", value, low=0.0)
        members = self.world_model.value_ensemble_size
        if value > 0 and members is not None and members < 2:
            raise ValueError(f"uncertainty_weight={value} needs a value ensemble of at least 2 members to measure "
                             f"disagreement; this world model has {members} (num_q={members}). Use a model with "
                             "num_q >= 2 or set uncertainty_weight=0.")
        return value

    def _maybe_compiled(self, name: str, fn):
        if not self.compile_mode:
            return fn
        compiled = self._compiled.get(name)
        if compiled is None:
            mode = None if self.compile_mode is True else self.compile_mode
            # A code object of its own per planner: dynamo keeps its compiled graphs (one per batch size and
            # per variant: with/without gradient, with/without the uncertainty) on the code object, with a
            # small limit; planners of different configurations must not share it.
            own = types.FunctionType(fn.__code__.replace(co_name=f"{fn.__name__}_{id(self):x}"), fn.__globals__,
                                     fn.__name__, fn.__defaults__, fn.__closure__)
            compiled = self._compiled[name] = torch.compile(own, mode=mode, dynamic=False)
        return compiled

    def imagine(self, z0: torch.Tensor, actions: torch.Tensor, terminal_eps: torch.Tensor | None,
                uncertainty: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Imagined return of action sequences, and optionally their ensemble disagreement.

        ``ret = Σ_{t<H} γ^t r(z_t, a_t) + γ^H v_H`` and with ``uncertainty=True`` also ``unc = Σ_{t≤H} u_t``, the
        Dream-MPC penalty before its weight λ, where ``v_H`` and ``u_t`` are the model's
        :meth:`~torchrl_dreammpc.modules.WorldModelBase.trajectory_values`: for a state-action model (TD-MPC2's
        ``_estimate_value``) ``v_H = Q̄(z_H, π(z_H))`` (``Q̄ = value(reduce="avg")``) and
        ``u_t = value_disagreement(z_t, a_t)`` (``a_H = π(z_H)``); for a state-value model (BMPC's)
        ``v_H = V̄(z_H)`` and ``u_t`` the disagreement of its V ensemble at ``z_t``.
        If the model is episodic (``termination()`` is not ``None``), rewards, the terminal value and the
        penalty after the first predicted termination (probability > 0.5) are dropped, as in TD-MPC2.

        Dynamics are sequential; the rewards of the whole horizon are one ``reward`` call, and all ``H+1``
        ensemble evaluations are one ``value_and_disagreement`` call.

        Args:
            z0 (Tensor): start latents ``[M, L]``, or ``[R, L]`` with each latent shared by ``M / R`` consecutive
                rows of ``actions`` (every candidate of an env starts from the same latent: the model may then
                compute what depends on it once).
            actions (Tensor): ``[H, M, A]`` (may require grad: the result is differentiable w.r.t. it).
            terminal_eps (Tensor or None): standard-normal noise ``[M, A]`` for the sample ``π(z_H)`` (``None``:
                the prior's mean action).
            uncertainty (bool): also return the summed disagreement.

        Returns:
            ``(ret [M, 1], unc [M, 1] or None)``.
        """
        weights = self._discounts(actions.shape[0], z0.device, z0.dtype)  # [H+1, 1, 1]
        fn = self._maybe_compiled("imagine", _imagine)
        return fn(self._ops(), z0, actions, terminal_eps, weights, uncertainty)

    def rollout_prior(self, z0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Sampled rollouts of the policy prior in the model: ``a_t = π(z_t)`` (noise ``eps[t]``), ``z_{t+1} =
        next(z_t, a_t)``; ``H`` prior calls and ``H-1`` model steps, as TD-MPC2 samples its policy trajectories.

        Args:
            z0 (Tensor): start latents ``[R, L]``, each shared by ``M / R`` consecutive rollouts.
            eps (Tensor): standard normals ``[H, M, A]``.

        Returns:
            actions ``[H, M, A]``.
        """
        return self._maybe_compiled("rollout", _rollout_prior)(self._ops(), z0, eps)

    def clamp_action(self, action: torch.Tensor) -> torch.Tensor:
        return torch.clamp(action, self.action_low, self.action_high)

    def _model_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        for t in self.world_model.parameters():
            return t.device, t.dtype
        for t in self.world_model.buffers():
            return t.device, t.dtype
        return torch.device("cpu"), torch.get_default_dtype()

    def _check_observation(self, obs: torch.Tensor) -> None:
        """The observation's width (free: no device sync). Its values are checked with the action after planning."""
        wm = self.world_model
        if hasattr(wm, "check_inputs"):
            wm.check_inputs(obs=obs, check_finite=False)
            return
        obs_dim = getattr(wm, "obs_dim", None)
        if obs_dim is not None and obs.shape[-1] != obs_dim:
            raise ValueError(f"observation has width {obs.shape[-1]} (shape {tuple(obs.shape)}) but the world model "
                             f"expects width {obs_dim}.")

    def _checks_finite(self, obs: torch.Tensor) -> bool:
        return self.check_finite or (self.check_finite is None and obs.device.type == "cpu")

    def _check_finite_step(self, obs: torch.Tensor, action: torch.Tensor, objective: torch.Tensor | None) -> None:
        """Raises :class:`NonFiniteActionError` if the observation, the action or the executed plan's objective
        (when the planner reports one) has a NaN/inf. The fast path is a sum of each (NaN and inf propagate through
        a sum; three small kernels and one host read); the exact search runs only when the sum is not finite (which
        a sum of large finite values can also be: then nothing is raised). On failure the warm start is dropped."""
        total = obs.sum().item() + action.sum().item() + (0.0 if objective is None else objective.sum().item())
        if math.isfinite(total):
            return
        tensors = (obs, action) if objective is None else (obs, action, objective)
        if all(bool(torch.isfinite(t).all()) for t in tensors):
            return
        self._clear_state()
        name = type(self).__name__
        bad_obs = ~torch.isfinite(obs.reshape(-1, obs.shape[-1]))
        if bad_obs.any():
            envs = bad_obs.any(-1).nonzero().flatten().tolist()
            raise NonFiniteActionError(
                f"{name}: the observation {self.observation_key!r} holds {int(bad_obs.sum())} NaN/inf value(s) (in "
                f"env(s) {envs[:8]}{' ...' if len(envs) > 8 else ''} of the flattened batch); refusing to plan from "
                "it. Check the environment and its observation transforms.")
        for kind, tensors in (("parameter", self.world_model.named_parameters()),
                              ("buffer", self.world_model.named_buffers())):
            for tensor_name, tensor in tensors:
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise NonFiniteActionError(
                        f"{name}: the world model's {kind} {tensor_name!r} holds "
                        f"{int((~torch.isfinite(tensor)).sum())} NaN/inf value(s) (a diverged update or a corrupted "
                        "checkpoint), so planning gave a NaN/inf result; reload good weights.")
        what = "action" if not bool(torch.isfinite(action).all()) else "imagined return of the executed plan"
        raise NonFiniteActionError(
            f"{name}: planning gave a NaN/inf {what} from a finite observation and finite world-model weights "
            f"({self.extra_repr()}); the imagined returns overflowed: check the planner's arguments and the model's "
            "predictions.")

    # ------------------------------------------------------------------ the actor
    @abc.abstractmethod
    def plan(self, z0: torch.Tensor, warm: torch.Tensor | None, explore: bool) -> tuple[torch.Tensor, dict]:
        """One control step for ``B`` envs.

        Args:
            z0 (Tensor): encoded observations ``[B, L]``.
            warm (Tensor or None): ``[B]`` float, 1 where the env continues an episode and :attr:`last_plan`
                holds its previous plan, 0 where it starts afresh; ``None`` when no env has a previous plan.
            explore (bool): exploration (``True``) or evaluation (``False``) mode.

        Returns:
            ``(action [B, A] within the bounds, diagnostics: dict name → [B] or [B, 1] tensor, may be empty)``.
            With an :attr:`expert_key`, the diagnostics also hold the expert distribution, ``"expert_loc"`` and
            ``"expert_scale"`` ``[B, A]`` (written under ``expert_key``, whether or not ``diagnostics`` is set).

        A planner that ranks plans may also set ``self._objective`` (``[B, 1]``, the executed plan's score, NaN/inf
        where it could not be scored): the finiteness check (``check_finite``) then refuses a step whose plan was
        picked among unscorable ones, which a finite action alone would not reveal.
        """

    def _check_latent(self, z: torch.Tensor) -> None:
        latent_dim = self.world_model.latent_dim
        if z.shape[-1] != latent_dim:
            raise ValueError(f"{self.latent_key!r} has width {z.shape[-1]} (shape {tuple(z.shape)}) but the world "
                             f"model's latent has width {latent_dim}.")
        if self.check_finite and not bool(torch.isfinite(z).all()):
            raise ValueError(f"{self.latent_key!r} contains NaN/inf values; refusing to plan from it.")

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        reads_latent = self.latent_key is not None
        key = self.latent_key if reads_latent else self.observation_key
        obs = tensordict.get(key, None)
        if obs is None:
            hint = (" It is written by the world model's state estimator: act through "
                    "world_model.acting_module(planner), in an env with world_model.acting_transforms()."
                    if reads_latent else "")
            raise KeyError(f"{type(self).__name__} needs {key!r} in the input tensordict.{hint}")
        if obs.ndim == 0:
            raise ValueError(f"{key!r} must have shape [..., width], got a scalar.")
        if reads_latent:
            self._check_latent(obs)
        else:
            self._check_observation(obs)
        batch_shape = obs.shape[:-1]
        device, dtype = self._model_device_dtype()
        flat = obs.reshape(-1, obs.shape[-1]).to(device=device, dtype=dtype)
        B = flat.shape[0]
        if self._state_batch != B or self._state_device != device:
            # A new batch size (or device) means new environments: no previous plan to warm-start from.
            self._clear_state()
            self._state_batch, self._state_device = B, device
        if self.action_low.device != device:
            self.action_low, self.action_high = self.action_low.to(device), self.action_high.to(device)
        warm = None
        if self._has_prev is not None:
            has_prev = self._has_prev
            is_init = tensordict.get(self.is_init_key, None)
            if is_init is not None:
                has_prev = has_prev & ~is_init.reshape(-1).to(device=device, dtype=torch.bool)
            warm = has_prev.to(dtype)
        explore = self.exploring()
        # Planning differentiates w.r.t. the actions: inference tensors (torch.inference_mode) cannot enter autograd.
        inference = torch.is_inference_mode_enabled()
        with torch.inference_mode(False) if inference else contextlib.nullcontext():
            if inference:
                flat = flat.clone()
                warm = warm.clone() if warm is not None else None
            self.__dict__["_step_ops"] = ops = self.world_model.planning_ops()
            self._objective = None
            try:
                with torch.no_grad():
                    z0 = flat.detach() if reads_latent else ops.encode(flat)
                action, diag = self.plan(z0, warm, explore)
            finally:
                self.__dict__["_step_ops"] = None
            self._has_prev = torch.ones(B, dtype=torch.bool, device=device)
        action = action.reshape(*batch_shape, self.action_dim).to(obs.device)
        if self._checks_finite(obs):
            self._check_finite_step(obs, action, self._objective)
        self._objective = None
        tensordict.set(self.action_key, action)
        expert = diag.pop("expert_loc", None), diag.pop("expert_scale", None)
        if self.expert_key is not None and expert[0] is not None:
            for name, value in zip(("loc", "scale"), expert):
                tensordict.set(self._expert_entry(name), value.reshape(*batch_shape, self.action_dim).to(obs.device))
        if self.diagnostics:
            for name, value in diag.items():
                value = value.reshape(*batch_shape, -1) if value.ndim > 1 else value.reshape(*batch_shape, 1)
                tensordict.set((self.diagnostics_key, name), value.to(obs.device))
        return tensordict

    def extra_repr(self) -> str:
        return (f"in_keys={self.in_keys}, out_keys={self.out_keys}, action_dim={self.action_dim}, "
                f"diagnostics={self.diagnostics}")
