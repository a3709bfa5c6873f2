"""Argument checks shared by the engine and the adapters: each returns the clean value or raises a clear error."""

from __future__ import annotations

import math
import numbers
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

REDUCTIONS = ("sum", "mean")


def package_dirs(*names: str) -> tuple[str, ...]:
    """The folders (with a trailing separator) of the loaded packages ``names``, as installed; by default hcl's own (the
    engine, the callbacks, the data modules)."""
    return tuple(os.path.dirname(module.__file__) + os.sep
                 for name in names or ("hcl", "hcl.callbacks", "hcl.datamodules")
                 if getattr(module := sys.modules.get(name), "__file__", None))


def caller_stacklevel() -> int:
    """``warnings.warn``'s ``stacklevel`` for the first frame outside hcl, from the function that calls this one: a
    warning about a caller's input shows the caller's line, however deep in hcl it is raised."""
    dirs = package_dirs()
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(dirs):
        frame, level = frame.f_back, level + 1
    return level


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def as_int(value: Any) -> Any:
    """A numpy (or other ``numbers.Integral``) integer as a Python ``int``; anything else as it is, for the caller's
    check to refuse."""
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed: an integer torch's generators take (``[-2⁶³, 2⁶³)``; above, "Overflow when unpacking long long")."""
    value = as_int(value)
    if not is_int(value):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{name} must lie in [-2**63, 2**63), got {value}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """A flag: ``True`` or ``False`` (numpy's too) only: a string such as ``"false"`` would count as true."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_every_n_steps(every_n_steps: int) -> int:
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
    return every_n_steps


def check_probe(probe: Tensor | None, name: str = "probe") -> Tensor | None:
    """Validate a user-given probe tensor early (in ``__init__``)."""
    if probe is None:
        return None
    if not isinstance(probe, Tensor):
        try:
            probe = torch.as_tensor(probe)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a tensor (or convertible to one), got {type(probe).__name__}") from err
    if probe.ndim == 0:
        raise ValueError(f"{name} must have a leading sample dimension, got a 0-dimensional tensor")
    if probe.shape[0] == 0:
        raise ValueError(f"{name} is empty: it must hold at least one sample")
    if probe.is_complex() or probe.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got {probe.dtype}")
    if probe.is_floating_point() and not torch.isfinite(probe).all():
        raise ValueError(f"{name} contains NaN or inf")
    return probe


def check_probe_and_target(probe: Tensor | None, target: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Validate a ``probe``/``target`` pair early: each as :func:`check_probe`, both or neither, same length."""
    probe, target = check_probe(probe), check_probe(target, "target")
    if (probe is None) != (target is None):
        raise ValueError("probe and target go together: pass both or neither")
    if probe is not None and probe.shape[0] != target.shape[0]:
        raise ValueError(f"probe has {probe.shape[0]} samples but target {target.shape[0]}")
    return probe, target


def check_prefix(prefix: str) -> str:
    """A tag prefix: letters, digits, ``_``, ``-`` and ``.`` (not ``.`` or ``..``): it names chart folders too."""
    if not isinstance(prefix, str) or not re.fullmatch(r"[\w.-]+", prefix, re.ASCII) or prefix in (".", ".."):
        raise ValueError(f"prefix must be a name of letters, digits, '_', '-' and '.', got {prefix!r}")
    return prefix


def check_weight_decay(value: Any, name: str = "weight_decay (λ)") -> float:
    """``λ``: a real number, finite and ``≥ 0``, with ``2λ`` (the convex program's group-norm weight) finite too."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value}")
    if not math.isfinite(2.0 * float(value)):
        raise ValueError(f"{name} = {value} is too large: the convex program's weight 2λ overflows")
    return float(value)


def check_seconds(value: Any, name: str) -> float | None:
    """A time limit: ``None`` or a positive, finite number of seconds."""
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number of seconds or None, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value}")
    return float(value)


def check_reduction(value: Any, name: str = "reduction") -> str:
    """A data-term reduction: ``"sum"`` or ``"mean"``."""
    if value not in REDUCTIONS:
        raise ValueError(f"{name} must be one of {REDUCTIONS}, got {value!r}")
    return value


def read_checkpoint(path: Any, name: str) -> dict[str, Any]:
    """The dictionary a checkpoint file holds, read on the CPU; ``name`` is the argument that named the file.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a file torch cannot read as a checkpoint (another format, a truncated file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - unpickling garbage raises anything (KeyError, UnpicklingError, ...)
        raise ValueError(f"{name}: {path} is not a checkpoint torch can read ({type(error).__name__}: {error})") \
            from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{name}: {path} holds a {type(checkpoint).__name__}, not a checkpoint's dictionary")
    return checkpoint


def check_resumable(checkpoint: dict[str, Any], module: torch.nn.Module, name: str) -> None:
    """Refuse a checkpoint whose weights are not ``module``'s: other names (another model class) or other shapes
    (another size), named in one line.

    Raises:
        ValueError: naming the first differing weights.
    """
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"{name}: the file holds no state_dict (not a Lightning checkpoint)")
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    model = type(module).__name__
    if missing or unexpected:
        raise ValueError(f"{name}: the checkpoint is not of a {model} (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}): resume with the model class it was trained with")
    for key, tensor in own.items():
        if hasattr(state[key], "shape") and tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: {key} has shape {tuple(state[key].shape)} in the checkpoint but "
                             f"{tuple(tensor.shape)} in this {model}: resume with the sizes it was trained with")


def cast_to_checkpoint(module: torch.nn.Module, checkpoint: dict) -> None:
    """Give ``module`` the floating dtype of the checkpoint's weights before Lightning loads them (from a model's
    ``on_load_checkpoint``): a float64 run's weights were loaded into the float32 module it starts as, before the
    precision plugin casts it, and rounded to float32 (a resumed run then drifted from the uninterrupted one by
    2e-8)."""
    weights = checkpoint.get("state_dict", {}).values()
    dtypes = {t.dtype for t in weights if torch.is_tensor(t) and t.is_floating_point()}
    if len(dtypes) == 1:
        module.to(dtypes.pop())


def check_classes(trainer: Any, module: Any) -> None:
    """Raise when the trainer's data module has classes the model's outputs cannot hold: more labels than outputs
    crash in the accuracy metric, and one output would silently regress on the class indices."""
    classes = getattr(getattr(trainer, "datamodule", None), "num_classes", None)
    outputs = module.hparams.out_features
    if classes is not None and (classes > 2 or outputs > 1) and classes != outputs:
        raise ValueError(f"{type(module).__name__}(out_features={outputs}) cannot fit a data set of {classes} classes: "
                         f"set out_features={classes}")


def warn_about_training_setup(trainer: Any, reduction: str) -> None:
    """:class:`hcl.ConvexReLU`'s training set-up: an optimizer of a subclass's own with a weight decay (a coupled one
    adds a ridge its objective and certificate leave out, a decoupled one a shrinkage no λ matches), and reloaded
    loaders with a summed loss."""
    if reduction == "sum" and getattr(trainer, "reload_dataloaders_every_n_epochs", 0):
        warnings.warn("ConvexReLU(reduction='sum') scales each batch by the n of the training data read when "
                      "training starts, which reloaded loaders may change: use reduction='mean'", stacklevel=3)
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            wd = float(group.get("weight_decay") or 0.0)
            if wd > 0 and (group.get("decoupled_weight_decay") or isinstance(opt, torch.optim.AdamW)):
                warnings.warn(f"ConvexReLU: the optimizer's decoupled weight_decay={wd:g} shrinks U outside the "
                              "gradient, which no λ of the program matches (its objective and certificate leave it "
                              "out): set λ with weight_decay= instead", stacklevel=3)
                return
            if wd > 0:
                warnings.warn(f"ConvexReLU: the optimizer's weight_decay={wd:g} adds a ridge (wd/2)‖U‖² to the "
                              "program, which its objective and certificate leave out: set λ with weight_decay= "
                              "instead", stacklevel=3)
                return


def warn_if_schedulers_idle(trainer: Any) -> None:
    """:class:`hcl.ConvexReLU` steps its optimizer itself (manual optimization), and Lightning steps no scheduler then:
    one never stepped by the end of training is said (its first lr was the proximal step's all along)."""
    idle = [type(config.scheduler).__name__ for config in getattr(trainer, "lr_scheduler_configs", None) or ()
            if getattr(config.scheduler, "last_epoch", 1) == 0]  # 0 until stepped (ReduceLROnPlateau too)
    if idle:
        warnings.warn(f"ConvexReLU: the scheduler {idle[0]} was never stepped: under manual optimization Lightning "
                      "steps none; step it in training_step (self.lr_schedulers().step())", stacklevel=3)
