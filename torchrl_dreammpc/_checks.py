"""Argument checks shared by the constructors (planners, losses, stepper, world-model config).

Each returns the value converted to its Python type, or raises a ``ValueError`` that names the argument and the
value received. They exist because the obvious one-liners accept the wrong things: ``value > 0`` is true for
``inf``, ``value < 0`` is false for NaN, ``bool("false")`` is ``True`` (a Hydra override given as a string), and
``torch.compile`` checks its ``mode`` only when it first compiles.
"""
from __future__ import annotations

import math
import numbers

__all__ = ["MissingKeyError", "check_int", "check_float", "check_bool", "check_compile"]

#: ``torch.compile`` modes known without importing inductor (``torch._inductor.list_mode_options()`` is asked for
#: anything else, so a mode added by a later torch is accepted).
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class MissingKeyError(KeyError):
    """A tensordict lacks an entry that is required (rather than defaulted); the message names it. (A ``KeyError``
    whose message prints as written: ``KeyError`` itself shows the repr of its argument.)"""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def check_int(name: str, value, minimum: int) -> int:
    """An integer (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_float(name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False,
                high_open: bool = False) -> float:
    """A finite real number (not a bool, not NaN, not ±inf) within ``[low, high]`` (``low_open`` /
    ``high_open``: excluding that end)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}.")
    value = float(value)
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}.")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}.")
    return value


def check_bool(name: str, value) -> bool:
    """A real ``bool``: strings (``"false"`` from a command line) and numbers are refused rather than guessed."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r} ({type(value).__name__}).")
    return value


def _compile_modes() -> tuple[str, ...]:
    try:
        from torch._inductor import list_mode_options

        return tuple(dict.fromkeys((*_COMPILE_MODES, *list_mode_options())))
    except Exception:  # an inductor that cannot be imported: the modes torch 2.x documents
        return _COMPILE_MODES


def check_compile(name: str, value) -> bool | str:
    """``True`` / ``False`` or a ``torch.compile`` mode name, checked now rather than at the first compilation."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and (value in _COMPILE_MODES or value in _compile_modes()):
        return value
    raise ValueError(f"{name} must be true, false or a torch.compile mode ({', '.join(_compile_modes())}), got "
                     f"{value!r}.")
