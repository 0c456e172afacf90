"""Loading TD-MPC2 / BMPC checkpoints into our world models, and our own format (every model family).

Two on-disk formats are understood:

* **TD-MPC2's** (its public code): ``torch.save({"model": WorldModel.state_dict()})`` or a bare state dict with
  keys ``_encoder.state.*``, ``_dynamics.*``, ``_reward.*``, ``_pi.*``, ``_termination.*`` (episodic tasks),
  the Q ensemble stacked over heads (``_Qs.params.<layer>.<weight|bias|ln.weight|ln.bias>``), its duplicated
  ``_detach_Qs_params.*`` view, the target Qs ``_target_Qs_params.*``, data-less (meta) placeholders
  ``_Qs.module.*`` / ``_detach_Qs.module.*`` / ``_target_Qs.module.*``, ``log_std_min`` / ``log_std_dif`` and
  possibly ``__batch_size`` / ``__device`` entries. Checkpoints of its older API store the ensembles as
  ``_Qs.params.<flat index>`` / ``_target_Qs.params.<flat index>`` (4 tensors per layer: weight, bias,
  ln.weight, ln.bias) and have no ``log_std_*`` entries. :func:`from_tdmpc2_checkpoint` reads both. BMPC's code
  (built on TD-MPC2's) writes the same keys, with a state-value ensemble (``_Qs`` whose input is the latent alone)
  and ``expl_log_std_min`` / ``expl_log_std_dif``: such a checkpoint gives a
  :class:`~torchrl_dreammpc.modules.BMPCWorldModel`.
* **Ours**: ``{"format": "torchrl_dreammpc.world_model", "version": 1, "config": asdict(model.config),
  "state_dict": model.state_dict()}``, written by :func:`save_world_model` and read by :func:`load_world_model`,
  which rebuilds the model of the family the file records (:data:`FAMILIES`). :func:`load_any` takes either
  format. A model of another family than TD-MPC2's (:class:`~torchrl_dreammpc.modules.BMPCWorldModel`,
  :class:`~torchrl_dreammpc.modules.DreamerV3WorldModel`) adds ``"family": "bmpc"`` / ``"dreamer_v3"``; a file
  without that entry is a TD-MPC2 model, so TD-MPC2 files keep exactly the layout they always had (and code that
  predates a family refuses its files by name rather than misreading them).

Every loader validates the complete converted state dict (keys, shapes, data) against the architecture before a
model is built, and raises :class:`CheckpointError` naming the problem; no partially loaded model is returned.
Files are read with ``torch.load(..., weights_only=True)``: a checkpoint that needs arbitrary unpickling is
refused (load it yourself with ``weights_only=False`` if you trust it, and pass the dict).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from torchrl_dreammpc.modules.bmpc import BMPCConfig, BMPCWorldModel
from torchrl_dreammpc.modules.dreamer import DreamerV3Config, DreamerV3WorldModel
from torchrl_dreammpc.modules.world_model import (
    MODEL_SIZES,
    TDMPC2Config,
    TDMPC2WorldModel,
    discount_from_episode_length,
)

__all__ = [
    "CheckpointError",
    "write_text_atomic",
    "FORMAT",
    "check_finite_state",
    "FORMAT_VERSION",
    "FAMILIES",
    "build_world_model",
    "convert_tdmpc2_state_dict",
    "from_tdmpc2_checkpoint",
    "to_tdmpc2_state_dict",
    "tdmpc2_config_overrides",
    "save_tdmpc2_checkpoint",
    "save_world_model",
    "load_world_model",
    "load_any",
]

FORMAT = "torchrl_dreammpc.world_model"
FORMAT_VERSION = 1
#: Model families of our format: name (the model's ``family``) -> (config class, model class). A file without a
#: "family" entry is "tdmpc2" (the only family when the format was defined).
FAMILIES: dict[str, tuple[type, type]] = {
    "tdmpc2": (TDMPC2Config, TDMPC2WorldModel),
    "bmpc": (BMPCConfig, BMPCWorldModel),
    "dreamer_v3": (DreamerV3Config, DreamerV3WorldModel),
}


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the requested model; the message names the problem."""


# ---------------------------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------------------------
def _read(path: str | os.PathLike) -> Any:
    """``torch.load`` on CPU with weights only, turning the many ways a bad file fails into one clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file {str(path)!r} does not exist (or is not a file).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip errors (truncated), unpickling errors (not a checkpoint), EOF...
        text = str(err)
        # torch wraps every weights-only failure in the same preamble; the line after it says what failed.
        detail = text.split("WeightsUnpickler error:")[-1].strip().split("\n")[0].strip() or type(err).__name__
        if "Unsupported global" in text:
            raise CheckpointError(
                f"Checkpoint {str(path)!r} contains Python objects that cannot be loaded with weights_only=True "
                f"({detail}). If you trust the file, load it with torch.load(path, weights_only=False) and pass the "
                f"resulting dict instead.") from err
        raise CheckpointError(
            f"Could not read {str(path)!r} as a torch checkpoint: the file is truncated/corrupted or not a "
            f"checkpoint ({type(err).__name__}: {detail[:200]}).") from err


def _is_ours(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT


# ---------------------------------------------------------------------------------------------------------------
# TD-MPC2 → ours
# ---------------------------------------------------------------------------------------------------------------
# TD-MPC2 module prefix → our module prefix, for the plain (non-ensemble) MLPs. Both use NormedLinear layers with
# the same parameter names (weight, bias, ln.weight, ln.bias), so only the prefix changes.
_MLP_PREFIXES = {
    "_encoder.state.": "encoder.module.",
    "_dynamics.": "dynamics.module.net.",
    "_reward.": "reward_head.module.net.",
    "_pi.": "policy_head.module.net.",
    "_termination.": "termination_head.module.",
}
# Stacked Q ensembles: TD-MPC2's per-layer names → EnsembleMLP's flat names.
_Q_PREFIXES = {
    "_Qs.params.": "qvalue.module.net.",
    "_target_Qs_params.": "target_qvalue.module.net.",
}
_Q_NAMES = {"weight": "weight_{}", "bias": "bias_{}", "ln.weight": "ln_weight_{}", "ln.bias": "ln_bias_{}"}
# TD-MPC2's old API ordered each Q layer's tensors like this in a flat ParameterList (api_model_conversion).
_OLD_Q_ORDER = ("weight", "bias", "ln.weight", "ln.bias")
_OLD_Q_PREFIXES = {"_Qs.params.": "_Qs.params.", "_target_Qs.params.": "_target_Qs_params."}
_LAYER_RE = re.compile(r"^(\d+)\.(weight|bias|ln\.weight|ln\.bias)$")
_OLD_RE = re.compile(r"^(_Qs\.params\.|_target_Qs\.params\.)(\d+)$")
# Entries with no weights of their own: the functional-ensemble module shells (meta tensors in TD-MPC2's state
# dict) and TensorDict metadata.
_IGNORED_RE = re.compile(r"^(_Qs|_detach_Qs|_target_Qs)\.module\.|(^|\.)__(batch_size|device)$")
_CORE_PREFIXES = ("_encoder.", "_dynamics.", "_reward.", "_pi.", "_Qs.")


def _unwrap_tdmpc2(obj: Any, where: str) -> Mapping:
    if _is_ours(obj):
        raise CheckpointError(f"{where} is a {FORMAT} checkpoint, not a TD-MPC2 one: use load_world_model() or "
                              f"load_any().")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a TD-MPC2 checkpoint (a dict with a "
                              f"'model' state dict, or a bare state dict).")
    sd = obj["model"] if isinstance(obj.get("model"), Mapping) else obj
    if not any(isinstance(k, str) and k.startswith(_CORE_PREFIXES) for k in sd):
        shown = sorted(map(str, sd))[:8]
        raise CheckpointError(
            f"{where} does not look like a TD-MPC2 world-model checkpoint: none of the expected keys "
            f"(_encoder.state.*, _dynamics.*, _reward.*, _pi.*, _Qs.*) is present; it has keys {shown}"
            f"{' ...' if len(sd) > 8 else ''}.")
    return sd


def _normalize_old_q_keys(sd: Mapping) -> dict:
    """Rename old-API ``_Qs.params.<n>`` / ``_target_Qs.params.<n>`` keys to the current per-layer names."""
    keys = [k for k in sd if isinstance(k, str)]
    old = [k for k in keys if _OLD_RE.match(k)]
    if not old:
        return dict(sd)
    new = [k for k in keys if k.startswith(("_Qs.params.", "_target_Qs_params.", "_detach_Qs_params."))
           and not _OLD_RE.match(k) and not _IGNORED_RE.search(k)]
    if new:
        raise CheckpointError(f"Checkpoint mixes old-format Q keys (e.g. {old[0]!r}) with new-format ones (e.g. "
                              f"{new[0]!r}); it is neither format.")
    out = {}
    for k, v in sd.items():
        m = _OLD_RE.match(k) if isinstance(k, str) else None
        if m is None:
            out[k] = v
        else:
            n = int(m.group(2))
            out[f"{_OLD_Q_PREFIXES[m.group(1)]}{n // 4}.{_OLD_Q_ORDER[n % 4]}"] = v
    return out


def _map_keys(sd: Mapping, strict: bool) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor],
                                                      dict[str, torch.Tensor]]:
    """Split a (normalized) TD-MPC2 state dict into: our-named tensors, our-name → source-name, the detached Q
    view (by our name), and the scalar extras (log_std_*). Raises on keys that belong nowhere (if strict)."""
    mapped: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    detach: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    q_prefixes = {**_Q_PREFIXES, "_detach_Qs_params.": "qvalue.module.net."}
    for key, val in sd.items():
        if not isinstance(key, str):
            unexpected.append(repr(key))
            continue
        if _IGNORED_RE.search(key):
            continue
        if key in ("log_std_min", "log_std_dif", "expl_log_std_min", "expl_log_std_dif"):
            extras[key] = val
            continue
        target = None
        for src, dst in _MLP_PREFIXES.items():
            if key.startswith(src) and _LAYER_RE.match(key[len(src):]):
                target = dst + key[len(src):]
        for src, dst in q_prefixes.items():
            m = _LAYER_RE.match(key[len(src):]) if key.startswith(src) else None
            if m:
                target = dst + _Q_NAMES[m.group(2)].format(m.group(1))
                if src == "_detach_Qs_params.":  # only checked against the online Qs, never loaded
                    detach[target] = val
                    target = ""
        if target is None:
            unexpected.append(key)
        elif target:
            mapped[target] = val
            source[target] = key
    if unexpected and strict:
        raise CheckpointError(f"Unexpected key(s) in the TD-MPC2 checkpoint (pass strict=False to ignore them): "
                              f"{sorted(unexpected)}")
    if unexpected:
        warnings.warn(f"Ignoring key(s) of the TD-MPC2 checkpoint that map to nothing: {sorted(unexpected)}",
                      stacklevel=4)
    return mapped, source, detach, extras


def _layers(mapped: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of layers of the plain MLP stored under our ``prefix``."""
    idx = {int(k[len(prefix):].split(".")[0]) for k in mapped if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def _need(mapped: Mapping[str, torch.Tensor], key: str, src: str, ndim: int) -> torch.Tensor:
    t = mapped.get(key)
    if t is None:
        raise CheckpointError(f"TD-MPC2 checkpoint is missing {src!r}, needed to infer the model sizes.")
    if not isinstance(t, torch.Tensor) or t.dim() != ndim:
        raise CheckpointError(f"TD-MPC2 checkpoint entry {src!r} should be a {ndim}-d tensor, got "
                              f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}.")
    return t


def _spec_dim(x, name: str) -> int | None:
    if x is None or isinstance(x, int):
        return x
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) == 0:
        raise TypeError(f"{name} must be an int or a TorchRL spec with a shape, got {x!r}")
    return int(shape[-1])


def _arch_enc_hidden(num_enc_layers: int) -> int:
    # TD-MPC2 builds max(num_enc_layers - 1, 1) hidden encoder layers, so 1 and 2 give the same network.
    return max(num_enc_layers - 1, 1)


def _pick_model_size(sizes: dict, n_params: int, config_class: type = TDMPC2Config) -> int:
    for ms, table in MODEL_SIZES.items():
        full = {"num_q": config_class.num_q, **table}
        if all(full[k] == sizes[k] for k in ("enc_dim", "mlp_dim", "latent_dim", "num_q")) and \
                _arch_enc_hidden(full["num_enc_layers"]) == _arch_enc_hidden(sizes["num_enc_layers"]):
            return ms
    # A custom architecture: model_size is only a label then; take the table entry closest in parameter count.
    return min(MODEL_SIZES, key=lambda ms: abs(math.log(max(n_params, 1) / (ms * 1e6))))


def convert_tdmpc2_state_dict(state_dict: Mapping, obs_dim=None, action_dim=None, *, model_size: int | None = None,
                              episode_length: int | None = None, discount: float | None = None,
                              strict: bool = True) -> tuple[TDMPC2Config, dict[str, torch.Tensor]]:
    """Convert a TD-MPC2 state dict into a :class:`TDMPC2Config` and a state dict for :class:`TDMPC2WorldModel`.

    A checkpoint of BMPC's code (its ``_Qs`` ensemble is a state-value ensemble: its input is the latent alone) is
    converted into a :class:`~torchrl_dreammpc.modules.BMPCConfig` and a :class:`BMPCWorldModel` state dict.

    Pure function: nothing is built, the input is not modified. The returned state dict has been checked key by key
    and shape by shape against the architecture the config describes, so ``load_state_dict`` on a model built from
    the config cannot fail. See :func:`from_tdmpc2_checkpoint` for the arguments.

    Returns:
        ``(config, state_dict)``.
    """
    where = "The checkpoint"
    sd = _unwrap_tdmpc2(state_dict, where)
    if "_task_emb.weight" in sd or "_action_masks" in sd:
        raise CheckpointError("This is a multi-task TD-MPC2 checkpoint (it has _task_emb.weight/_action_masks): "
                              "multi-task checkpoints are not supported yet.")
    rgb = [k for k in sd if isinstance(k, str) and k.startswith("_encoder.") and not k.startswith("_encoder.state.")]
    if rgb:
        raise CheckpointError(f"Only state-observation TD-MPC2 checkpoints are supported; this one has another "
                              f"encoder ({rgb[0]!r}, e.g. pixels).")
    if discount is not None and episode_length is not None:
        raise CheckpointError("Pass either discount or episode_length (from which TD-MPC2's heuristic derives the "
                              "discount), not both.")
    mapped, source, detach, extras = _map_keys(_normalize_old_q_keys(sd), strict)

    bad = [source[k] for k, v in mapped.items() if not isinstance(v, torch.Tensor) or v.is_meta
           or not v.is_floating_point()]
    if bad:
        raise CheckpointError(f"Checkpoint entries hold no floating-point weight data (meta or non-float): "
                              f"{sorted(bad)}")

    # ---- sizes, from tensor shapes ----
    n_enc = _layers(mapped, "encoder.module.")
    if n_enc < 2:
        raise CheckpointError(f"TD-MPC2 checkpoint encoder has {n_enc} layer(s) under '_encoder.state.'; "
                              f"expected at least 2.")
    enc0 = _need(mapped, "encoder.module.0.weight", "_encoder.state.0.weight", 2)
    enc_last = _need(mapped, f"encoder.module.{n_enc - 1}.weight", f"_encoder.state.{n_enc - 1}.weight", 2)
    pi_last = _need(mapped, "policy_head.module.net.2.weight", "_pi.2.weight", 2)
    dyn0 = _need(mapped, "dynamics.module.net.0.weight", "_dynamics.0.weight", 2)
    rew_last = _need(mapped, "reward_head.module.net.2.weight", "_reward.2.weight", 2)
    q0 = _need(mapped, "qvalue.module.net.weight_0", "_Qs.params.0.weight", 3)
    ck_obs, ck_latent = enc0.shape[1], enc_last.shape[0]
    if pi_last.shape[0] % 2:
        raise CheckpointError(f"'_pi.2.weight' has {pi_last.shape[0]} outputs; the policy head should output "
                              f"2 x action_dim (mean and log-std).")
    ck_action = pi_last.shape[0] // 2
    # BMPC's V ensemble reads the latent alone, TD-MPC2's Q ensemble the latent and the action.
    state_values = q0.shape[2] == ck_latent
    expl = {k for k in extras if k.startswith("expl_")}
    if expl and not state_values:
        raise CheckpointError("This is a BMPC checkpoint with a Q ensemble (use_v_instead_q: false), whose policy "
                              "head is BMPC's: not supported (only BMPC's state-value models, or TD-MPC2's).")
    if state_values:
        if episodic_keys := [k for k in mapped if k.startswith("termination_head.")]:
            raise CheckpointError(f"A state-value (BMPC) checkpoint with a termination head "
                                  f"({source[episodic_keys[0]]!r}) is not supported.")
        rename = {"qvalue.module.net.": "value_head.module.net.", "target_qvalue.module.net.":
                  "target_value_head.module.net."}
        for old in [k for k in mapped if k.startswith(tuple(rename))]:
            prefix = next(p for p in rename if old.startswith(p))
            new = rename[prefix] + old[len(prefix):]
            mapped[new], source[new] = mapped.pop(old), source.pop(old)
        detach = {rename["qvalue.module.net."] + k[len("qvalue.module.net."):]: v for k, v in detach.items()}
    config_class = BMPCConfig if state_values else TDMPC2Config

    # The task's sizes come first: that is the mismatch users actually hit (a checkpoint for another task).
    obs_dim, action_dim = _spec_dim(obs_dim, "obs_dim"), _spec_dim(action_dim, "action_dim")
    if obs_dim is not None and obs_dim != ck_obs:
        raise CheckpointError(f"Checkpoint expects observation width {ck_obs}, the task gives {obs_dim}.")
    if action_dim is not None and action_dim != ck_action:
        raise CheckpointError(f"Checkpoint expects action width {ck_action}, the task gives {action_dim}.")

    for name, prefix in (("_dynamics", "dynamics.module.net."), ("_reward", "reward_head.module.net."),
                         ("_pi", "policy_head.module.net."), ("_termination", "termination_head.module.")):
        n = _layers(mapped, prefix)
        if n not in (0, 3):
            raise CheckpointError(f"'{name}' has {n} layers; TD-MPC2 (and this model) use 2 hidden layers + output.")
    sizes = dict(enc_dim=enc0.shape[0], mlp_dim=dyn0.shape[0], latent_dim=ck_latent, num_enc_layers=n_enc,
                 num_q=q0.shape[0])
    num_bins = rew_last.shape[0]
    if num_bins < 2:
        raise CheckpointError(f"Checkpoint uses num_bins={num_bins} (TD-MPC2's non-two-hot regression mode), which "
                              f"is not supported; only two-hot heads (num_bins >= 2).")
    episodic = any(k.startswith("termination_head.") for k in mapped)
    n_params = sum(v.numel() for k, v in mapped.items() if not k.startswith("target_"))

    if model_size is not None:
        if model_size not in MODEL_SIZES:
            raise CheckpointError(f"Unknown model_size {model_size!r}; choose one of {sorted(MODEL_SIZES)}.")
        table = {"num_q": config_class.num_q, **MODEL_SIZES[model_size]}
        diff = [f"{k}: checkpoint {sizes[k]}, model_size {model_size} has {table[k]}"
                for k in ("enc_dim", "mlp_dim", "latent_dim", "num_q") if sizes[k] != table[k]]
        if _arch_enc_hidden(table["num_enc_layers"]) != _arch_enc_hidden(n_enc):
            diff.append(f"encoder layers: checkpoint {n_enc}, model_size {model_size} has "
                        f"{_arch_enc_hidden(table['num_enc_layers']) + 1}")
        if diff:
            raise CheckpointError(f"Checkpoint does not match model_size={model_size}: " + "; ".join(diff) + ".")
    else:
        model_size = _pick_model_size(sizes, n_params, config_class)
    # Keep the table's num_enc_layers when it describes the same network (TD-MPC2's 1 == 2 equivalence).
    table_layers = MODEL_SIZES[model_size]["num_enc_layers"]
    if _arch_enc_hidden(table_layers) == _arch_enc_hidden(n_enc):
        sizes["num_enc_layers"] = table_layers

    # ---- constants not visible in the shapes ----
    fields: dict[str, Any] = dict(sizes, num_bins=num_bins, episodic=episodic)
    for prefix in ("", "expl_"):
        pair = {f"{prefix}log_std_min", f"{prefix}log_std_dif"}
        if pair & set(extras):
            if not pair <= set(extras):
                raise CheckpointError(f"Checkpoint has {sorted(pair & set(extras))} but not both of {sorted(pair)}.")
            lo, dif = (float(torch.as_tensor(extras[k]).reshape(())) for k in sorted(pair, reverse=True))
            fields.update({f"{prefix}log_std_min": lo, f"{prefix}log_std_max": lo + dif})
    # else (old API): TD-MPC2 itself fills these in from its config defaults, which are ours too (BMPC's: BMPC's).
    if discount is not None:
        fields["discount"] = float(discount)
    elif episode_length is not None:
        fields["discount"] = discount_from_episode_length(episode_length)
    if ck_latent % TDMPC2Config.simnorm_dim:
        raise CheckpointError(f"latent_dim {ck_latent} is not a multiple of the SimNorm group size "
                              f"{TDMPC2Config.simnorm_dim}.")
    try:
        config = config_class.from_size(ck_obs, ck_action, model_size, **fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"Cannot build a {config_class.__name__} from the checkpoint: {err}") from err

    # ---- every tensor against the architecture (a data-less model on the meta device) ----
    expected = _expected_shapes(config)
    missing = sorted(k for k in expected if k not in mapped)
    if missing:
        names = [_tdmpc2_name(k) for k in missing]
        raise CheckpointError(f"TD-MPC2 checkpoint is missing {len(missing)} tensor(s): {names}")
    extra = sorted(k for k in mapped if k not in expected)
    if extra:  # e.g. a 4th encoder layer index gap, or heads beyond what the sizes imply
        raise CheckpointError(f"Unexpected key(s) in the TD-MPC2 checkpoint: {sorted(source[k] for k in extra)}")
    wrong = [f"{source[k]} has shape {tuple(mapped[k].shape)}, expected {tuple(shape)}"
             for k, shape in expected.items() if tuple(mapped[k].shape) != tuple(shape)]
    if wrong:
        raise CheckpointError(
            f"TD-MPC2 checkpoint tensors do not fit a model with observation width {ck_obs}, action width "
            f"{ck_action}, latent {ck_latent}, mlp_dim {sizes['mlp_dim']}: " + "; ".join(wrong))
    # The detached view is the same storage as the online Qs in TD-MPC2; differing values mean an edited file.
    for k, v in detach.items():
        if k not in mapped:
            continue
        if not isinstance(v, torch.Tensor) or v.shape != mapped[k].shape or \
                (strict and not v.is_meta and not torch.equal(v.to(mapped[k].device), mapped[k])):
            raise CheckpointError(f"'_detach_Qs_params' differs from '_Qs.params' at {source[k]!r}; in TD-MPC2 "
                                  f"they are the same tensors (pass strict=False to use '_Qs.params').")
    return config, {k: mapped[k].detach() for k in expected}


def _tdmpc2_name(ours: str) -> str:
    ours = ours.replace("target_value_head.", "target_qvalue.").replace("value_head.", "qvalue.")
    for src, dst in _MLP_PREFIXES.items():
        if ours.startswith(dst):
            return src + ours[len(dst):]
    for src, dst in _Q_PREFIXES.items():
        if ours.startswith(dst):
            m = re.match(r"(ln_)?(weight|bias)_(\d+)$", ours[len(dst):])
            if m:
                return f"{src}{m.group(3)}.{'ln.' if m.group(1) else ''}{m.group(2)}"
    return ours


def _family(config) -> str:
    for name, (config_cls, _) in FAMILIES.items():
        if type(config) is config_cls:
            return name
    raise TypeError(f"Not the config of a known world-model family: {type(config).__name__}.")


def build_world_model(family: str, config: Mapping[str, Any]):
    """A freshly initialized model of ``family`` (a key of :data:`FAMILIES`) from its config's fields (as
    ``dataclasses.asdict(model.config)`` gives them): what every loader builds before it loads weights.

    Examples:
        >>> wm = build_world_model("bmpc", dataclasses.asdict(TDMPC2Config.from_size(5, 1, 1)) | {"num_q": 2})
        >>> type(wm).__name__, wm.config.num_q
        ('BMPCWorldModel', 2)
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown world-model family {family!r}; known: {sorted(FAMILIES)}.")
    fields = dict(config)
    obs_dim, action_dim, model_size = fields.pop("obs_dim"), fields.pop("action_dim"), fields.pop("model_size")
    return FAMILIES[family][1](obs_dim, action_dim, model_size=model_size, **fields)


def _build(config):
    return build_world_model(_family(config), dataclasses.asdict(config))


def _expected_shapes(config) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only: no memory, no initialization cost
        return {k: v.shape for k, v in _build(config).state_dict().items()}


def check_finite_state(state_dict: Mapping[str, torch.Tensor], where: str = "The checkpoint") -> None:
    """Raises :class:`CheckpointError` naming the tensors that hold NaN/inf values: a model loaded with them would
    plan with NaN scores (MPPI then picks actions at random without any error)."""
    bad = [f"{key} ({int((~torch.isfinite(value)).sum())})" for key, value in state_dict.items()
           if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.is_meta
           and not bool(torch.isfinite(value).all())]
    if bad:
        raise CheckpointError(f"{where} holds NaN/inf values in {len(bad)} tensor(s) (count in brackets): "
                              f"{', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}; refusing to load it.")


def _finish(config, state_dict: Mapping[str, torch.Tensor], device):
    check_finite_state(state_dict)
    model = _build(config)
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval()


def from_tdmpc2_checkpoint(path_or_state_dict, obs_dim=None, action_dim=None, *, model_size: int | None = None,
                           episode_length: int | None = None, discount: float | None = None,
                           device: str | torch.device = "cpu", strict: bool = True) -> TDMPC2WorldModel:
    """Build a :class:`TDMPC2WorldModel` from a checkpoint of TD-MPC2's public code (or a :class:`BMPCWorldModel`
    from one of BMPC's, which its state-value ensemble identifies: see :func:`convert_tdmpc2_state_dict`).

    Every tensor is mapped: encoder, dynamics, reward, policy prior, termination head (episodic models), the
    online Q ensemble and the target Qs. Sizes (observation and action widths, latent, enc/mlp dims, encoder
    depth, number of Q heads, bins, episodic) are read from tensor shapes; ``log_std_min`` / ``log_std_max`` from
    ``log_std_min`` / ``log_std_dif`` (old-API checkpoints lack them: TD-MPC2's defaults -10 / 2 are used, as TD-MPC2
    itself does). Constants not stored in checkpoints (two-hot range [-10, 10], SimNorm groups of 8, Q dropout 0.01)
    take TD-MPC2's defaults.

    The discount is not stored in TD-MPC2 checkpoints. It is ``discount`` if given, else TD-MPC2's heuristic
    (:func:`~torchrl_dreammpc.modules.discount_from_episode_length`) applied to ``episode_length`` if given (500 →
    0.99, 1000 → 0.995; take it from :func:`~torchrl_dreammpc.envs.task_info`: 500 agent steps for DMC, the
    length TD-MPC2 trains with), else the :class:`TDMPC2Config` default (0.99). Give the task's episode length to
    plan with the discount the checkpoint's values were trained with.

    Args:
        path_or_state_dict: a file path, or what ``torch.load`` returned: ``{"model": state_dict}`` or a bare
            state dict (current or old Q-ensemble format). It is not modified.
        obs_dim / action_dim (int or TorchRL spec, optional): the task's sizes; a checkpoint for other sizes is
            refused (``"Checkpoint expects observation width 5, the task gives 24."``).
        model_size (int, optional): if given, the checkpoint must have that size's dimensions; otherwise the size
            is recognized from the table (custom sizes get the closest label by parameter count).
        episode_length (int, optional): derive the discount with TD-MPC2's heuristic.
        discount (float, optional): the discount (exclusive with ``episode_length``).
        device: where the returned model lives.
        strict (bool): refuse keys that map to nothing and a ``_detach_Qs_params`` view that differs from the online
            Qs (default). With ``strict=False`` these are ignored; missing or misshapen tensors are always refused.

    Returns:
        the model, in eval mode (Q dropout off).

    Raises:
        CheckpointError: unreadable/truncated file, not a TD-MPC2 checkpoint, multi-task or pixel checkpoint,
            sizes that differ from ``obs_dim``/``action_dim``/``model_size``, missing, unexpected or misshapen
            tensors. Nothing is built before the whole state dict has been validated.

    Examples:
        >>> from torchrl_dreammpc.envs import task_info
        >>> model = from_tdmpc2_checkpoint("walker-walk-1.pt", obs_dim=24, action_dim=6,  # DMC: 500 steps, γ 0.99
        ...                                episode_length=task_info("walker-walk").episode_length)  # doctest: +SKIP
        >>> z = model.encode(torch.zeros(1, 24))  # doctest: +SKIP
    """
    obj = _read(path_or_state_dict) if isinstance(path_or_state_dict, (str, os.PathLike)) else path_or_state_dict
    config, state_dict = convert_tdmpc2_state_dict(
        obj, obs_dim, action_dim, model_size=model_size, episode_length=episode_length, discount=discount,
        strict=strict)
    return _finish(config, state_dict, device)


# ---------------------------------------------------------------------------------------------------------------
# ours → TD-MPC2
# ---------------------------------------------------------------------------------------------------------------
def _check_tdmpc2_model(model) -> TDMPC2Config:
    config = getattr(model, "config", None)
    # type(...) is, not isinstance: BMPC's config subclasses TDMPC2Config, but its V model has no TD-MPC2 layout.
    if type(config) is not TDMPC2Config:
        raise TypeError(f"Only a TD-MPC2 world model (TDMPC2WorldModel with a TDMPC2Config) has a TD-MPC2 layout; "
                        f"got {type(model).__name__} (family {getattr(model, 'family', None)!r}).")
    return config


def to_tdmpc2_state_dict(model: TDMPC2WorldModel) -> dict[str, torch.Tensor]:
    """The state dict that TD-MPC2's own ``WorldModel`` holds for the same weights: the inverse of
    :func:`convert_tdmpc2_state_dict` (our model → TD-MPC2's names and layout).

    Every tensor is there under TD-MPC2's name (``_encoder.state.*``, ``_dynamics.*``, ``_reward.*``,
    ``_termination.*`` for episodic models, ``_pi.*``, ``_Qs.params.*``, ``_target_Qs_params.*``), plus what
    TD-MPC2's ``load_state_dict`` expects besides the weights: the ``_detach_Qs_params.*`` view (the very same
    tensors as ``_Qs.params.*``, as in TD-MPC2), the data-less (meta) module shells ``_Qs.module.*``,
    ``_detach_Qs.module.*`` and ``_target_Qs.module.*``, and ``log_std_min`` / ``log_std_dif`` (float32
    scalars; TD-MPC2's config makes them integer buffers, into which ``load_state_dict`` copies -10 and 12 exactly).

    Not stored, as in TD-MPC2's own checkpoints: the discount (TD-MPC2 derives it from the task's episode length:
    500 steps → 0.99) and the constants of :func:`tdmpc2_config_overrides` (which TD-MPC2's config must match).

    Args:
        model (TDMPC2WorldModel): the model (any device; the returned tensors are on the CPU).

    Returns:
        ``{name: tensor}``; ``torch.save({"model": sd}, path)`` is TD-MPC2's checkpoint format
        (:func:`save_tdmpc2_checkpoint` does it atomically).

    Examples:
        >>> wm = TDMPC2WorldModel(5, 1, model_size=1)
        >>> sd = to_tdmpc2_state_dict(wm)
        >>> sd["_Qs.params.0.weight"].shape, sd["_Qs.module.0.weight"].is_meta
        (torch.Size([2, 384, 129]), True)
        >>> from_tdmpc2_checkpoint(sd, discount=wm.discount).config == wm.config
        True
    """
    config = _check_tdmpc2_model(model)
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    theirs = {name: ours.pop(key) for key, name in [(k, _tdmpc2_name(k)) for k in list(ours)] if name != key}
    if ours:  # a tensor with no TD-MPC2 counterpart: refuse rather than export a model TD-MPC2 would misread
        raise CheckpointError(f"No TD-MPC2 name for {sorted(ours)}; this model cannot be exported to TD-MPC2.")
    sd: dict[str, torch.Tensor] = {
        "log_std_min": torch.tensor(config.log_std_min, dtype=torch.float32),
        "log_std_dif": torch.tensor(config.log_std_max - config.log_std_min, dtype=torch.float32),
    }
    order = ("_encoder.", "_dynamics.", "_reward.", "_termination.", "_pi.", "_Qs.params.")
    for prefix in order:  # TD-MPC2's module order
        sd.update({k: v for k, v in theirs.items() if k.startswith(prefix)})
    q_keys = [k[len("_Qs.params."):] for k in theirs if k.startswith("_Qs.params.")]
    sd.update({f"_Qs.module.{k}": torch.empty(theirs[f"_Qs.params.{k}"].shape[1:], device="meta") for k in q_keys})
    sd.update({f"_detach_Qs_params.{k}": theirs[f"_Qs.params.{k}"] for k in q_keys})  # shared, as in TD-MPC2
    sd.update({k: v for k, v in theirs.items() if k.startswith("_target_Qs_params.")})
    for shell in ("_detach_Qs.module.", "_target_Qs.module."):
        sd.update({f"{shell}{k}": torch.empty(theirs[f"_Qs.params.{k}"].shape, device="meta") for k in q_keys})
    return sd


def tdmpc2_config_overrides(model: TDMPC2WorldModel) -> dict[str, Any]:
    """The values of TD-MPC2's ``config.yaml`` that its agent needs to load :func:`to_tdmpc2_state_dict` of
    ``model`` (sizes, constants and the observation/action shapes its parser would set from the task).

    Examples:
        >>> tdmpc2_config_overrides(TDMPC2WorldModel(5, 1, model_size=1))["mlp_dim"]
        384
    """
    c = _check_tdmpc2_model(model)
    return {"model_size": c.model_size, "obs": "state", "obs_shape": {"state": (c.obs_dim,)},
            "action_dim": c.action_dim, "episodic": c.episodic, "num_enc_layers": c.num_enc_layers,
            "enc_dim": c.enc_dim, "mlp_dim": c.mlp_dim, "latent_dim": c.latent_dim, "num_q": c.num_q,
            "num_bins": c.num_bins, "vmin": c.vmin, "vmax": c.vmax, "simnorm_dim": c.simnorm_dim,
            "dropout": c.dropout, "log_std_min": c.log_std_min, "log_std_max": c.log_std_max}


def save_tdmpc2_checkpoint(model: TDMPC2WorldModel, path: str | os.PathLike) -> Path:
    """Write ``model`` as a checkpoint of TD-MPC2's public code, ``{"model": to_tdmpc2_state_dict(model)}``
    (what its ``TDMPC2.save`` writes and ``TDMPC2.load`` reads), atomically.

    TD-MPC2's agent loads it when its config has the model's sizes (:func:`tdmpc2_config_overrides`; for the
    published model sizes, ``model_size=<n>`` and the task are enough). :func:`from_tdmpc2_checkpoint` reads it
    back into an identical model (give it the discount or the task's episode length, which are not stored).

    Examples:
        >>> p = save_tdmpc2_checkpoint(TDMPC2WorldModel(5, 1, model_size=1), "/tmp/cartpole-1.pt")  # doctest: +SKIP
    """
    return _atomic_save({"model": to_tdmpc2_state_dict(model)}, path)


def _atomic_save(payload: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``: an interrupted save never
    leaves a truncated file (an existing file at ``path`` stays intact until the new one is complete)."""
    return _atomic_write(path, lambda f: torch.save(payload, f))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``text`` written to ``path`` as :func:`save_world_model` writes a checkpoint (a temporary file, then
    ``os.replace``): a reader in another process sees the old file or the whole new one, never half of it."""
    return _atomic_write(path, lambda f: f.write(text.encode()))


def _atomic_write(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ---------------------------------------------------------------------------------------------------------------
# our own format
# ---------------------------------------------------------------------------------------------------------------
def save_world_model(model, path: str | os.PathLike) -> Path:
    """Save a world model of any family of :data:`FAMILIES` (:class:`TDMPC2WorldModel`,
    :class:`~torchrl_dreammpc.modules.BMPCWorldModel`, :class:`~torchrl_dreammpc.modules.DreamerV3WorldModel`) with
    its config, atomically.

    The file holds ``{"format": "torchrl_dreammpc.world_model", "version": 1, "config": asdict(model.config),
    "state_dict": model.state_dict()}`` (tensors moved to CPU), plus ``"family": model.family`` for a model of
    another family than TD-MPC2's. It is written to a temporary file in the same
    directory and moved into place with ``os.replace``, so an interrupted save never leaves a truncated checkpoint
    (an existing file at ``path`` stays intact until the new one is complete).

    Args:
        model: the model (online and target value ensembles / critics included).
        path: destination file; parent directories are created.

    Returns:
        the path written.

    Examples:
        >>> wm = TDMPC2WorldModel(5, 1, model_size=1)
        >>> p = save_world_model(wm, "/tmp/wm.pt")  # doctest: +SKIP
        >>> wm2 = load_world_model(p, obs_dim=5, action_dim=1)  # doctest: +SKIP
    """
    config = getattr(model, "config", None)
    family = getattr(model, "family", None)
    if family not in FAMILIES or type(config) is not FAMILIES[family][0]:
        raise TypeError(f"save_world_model expects a world model of a family of {sorted(FAMILIES)} with its config, "
                        f"got {type(model).__name__} (family {family!r}).")
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "config": dataclasses.asdict(config),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if family != "tdmpc2":
        payload["family"] = family
    return _atomic_save(payload, path)


def _config_diff(saved, expect) -> list[str]:
    name = type(saved).__name__
    if dataclasses.is_dataclass(expect) and not isinstance(expect, type):
        if type(expect) is not type(saved):
            return [f"model family: checkpoint {name}, expected {type(expect).__name__}"]
        expect = dataclasses.asdict(expect)
    if not isinstance(expect, Mapping):
        raise TypeError(f"expect_config must be a model config or a mapping of its fields, got {type(expect).__name__}")
    saved_d = dataclasses.asdict(saved)
    unknown = sorted(set(expect) - set(saved_d))
    if unknown:
        raise TypeError(f"expect_config has unknown {name} field(s) {unknown}")
    return [f"{k}: checkpoint {saved_d[k]!r}, expected {v!r}" for k, v in expect.items() if saved_d[k] != v]


def _from_ours(obj: Mapping, where: str, expect_config, obs_dim, action_dim, device):
    version = obj.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(f"{where} has {FORMAT} version {version!r}; this code reads version {FORMAT_VERSION}.")
    family = obj.get("family", "tdmpc2")
    if family not in FAMILIES:
        raise CheckpointError(f"{where} holds a world model of family {family!r}; this code reads {sorted(FAMILIES)}.")
    config_cls = FAMILIES[family][0]
    cfg_d, sd = obj.get("config"), obj.get("state_dict")
    if not isinstance(cfg_d, Mapping) or not isinstance(sd, Mapping):
        raise CheckpointError(f"{where} lacks its 'config' or 'state_dict' entry.")
    names = {f.name for f in dataclasses.fields(config_cls)}
    if set(cfg_d) - names:
        raise CheckpointError(f"{where} has unknown config field(s) {sorted(set(cfg_d) - names)}.")
    try:
        config = config_cls(**cfg_d)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where} has an incomplete or invalid config: {err}") from err
    obs_dim, action_dim = _spec_dim(obs_dim, "obs_dim"), _spec_dim(action_dim, "action_dim")
    if obs_dim is not None and obs_dim != config.obs_dim:
        raise CheckpointError(f"Checkpoint expects observation width {config.obs_dim}, the task gives {obs_dim}.")
    if action_dim is not None and action_dim != config.action_dim:
        raise CheckpointError(f"Checkpoint expects action width {config.action_dim}, the task gives {action_dim}.")
    if expect_config is not None:
        diff = _config_diff(config, expect_config)
        if diff:
            raise CheckpointError(f"{where} was saved with a different config: " + "; ".join(diff) + ".")
    try:
        expected = _expected_shapes(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where} has an invalid config: {err}") from err
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k} has shape {tuple(sd[k].shape)}, expected {tuple(s)}" for k, s in expected.items()
             if k in sd and (not isinstance(sd[k], torch.Tensor) or tuple(sd[k].shape) != tuple(s))]
    if missing or unexpected or wrong:
        parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {unexpected}"] if unexpected else []) \
            + wrong
        raise CheckpointError(f"{where}'s state dict does not match its config: " + "; ".join(parts))
    return _finish(config, sd, device)


def load_world_model(path: str | os.PathLike, expect_config=None, *, obs_dim=None, action_dim=None,
                     device: str | torch.device = "cpu"):
    """Load a model saved by :func:`save_world_model`, as the class of the family it was saved from.

    Args:
        path: the checkpoint file.
        expect_config (a model config or a mapping, optional): refuse the checkpoint unless its config has
            these values (all fields and the family of a config such as ``TDMPC2Config`` / ``BMPCConfig`` /
            ``DreamerV3Config``; only the given keys of a mapping). The error names every differing field.
        obs_dim / action_dim (int or TorchRL spec, optional): refuse a checkpoint made for other sizes.
        device: where the returned model lives.

    Returns:
        the model (of the family the file holds), in eval mode (call ``.train()`` to continue training).

    Raises:
        CheckpointError: unreadable file, wrong format tag, version or family (a TD-MPC2 checkpoint included: use
            :func:`load_any`), config mismatch, or a state dict that does not fit the config.

    Examples:
        >>> wm = load_world_model("runs/wm.pt", obs_dim=5, action_dim=1)  # doctest: +SKIP
    """
    obj = _read(path)
    where = f"Checkpoint {str(path)!r}"
    if not _is_ours(obj):
        hint = (" It looks like a TD-MPC2 checkpoint: use from_tdmpc2_checkpoint() or load_any()."
                if isinstance(obj, Mapping) and any(isinstance(k, str) and k.startswith(_CORE_PREFIXES)
                                                    for k in (obj.get("model") if isinstance(obj.get("model"), Mapping) else obj))
                else "")
        tag = obj.get("format") if isinstance(obj, Mapping) else None
        raise CheckpointError(f"{where} is not a {FORMAT} checkpoint (format tag {tag!r}).{hint}")
    return _from_ours(obj, where, expect_config, obs_dim, action_dim, device)


def load_any(path_or_state_dict, obs_dim=None, action_dim=None, *, expect_config=None,
             device: str | torch.device = "cpu", **tdmpc2_kwargs):
    """Load a world model from either our format or a TD-MPC2 checkpoint (detected from the content).

    Args:
        path_or_state_dict: a file path or an already loaded checkpoint dict.
        obs_dim / action_dim (int or TorchRL spec, optional): the task's sizes; checked for both formats.
        expect_config (optional): for our format, see :func:`load_world_model` (ignored for TD-MPC2 files, whose
            config is inferred).
        device: where the returned model lives.
        **tdmpc2_kwargs: ``model_size``, ``episode_length``, ``discount``, ``strict`` for TD-MPC2 checkpoints (see
            :func:`from_tdmpc2_checkpoint`); refused for our format, whose config is stored.

    Returns:
        the model, in eval mode.

    Examples:
        >>> model = load_any(cfg.checkpoint, obs_dim=env.observation_spec["observation"],
        ...                  action_dim=env.action_spec,
        ...                  episode_length=task_info(cfg.task).episode_length)  # doctest: +SKIP
    """
    is_path = isinstance(path_or_state_dict, (str, os.PathLike))
    obj = _read(path_or_state_dict) if is_path else path_or_state_dict
    if _is_ours(obj):
        given = {k: v for k, v in tdmpc2_kwargs.items() if v is not None and k != "strict"}
        if given:
            raise CheckpointError(f"{sorted(given)} only apply to TD-MPC2 checkpoints; this is a {FORMAT} "
                                  f"checkpoint with its config stored (use expect_config to check it).")
        where = f"Checkpoint {str(path_or_state_dict)!r}" if is_path else "The checkpoint"
        return _from_ours(obj, where, expect_config, obs_dim, action_dim, device)
    return from_tdmpc2_checkpoint(obj, obs_dim, action_dim, device=device, **tdmpc2_kwargs)
