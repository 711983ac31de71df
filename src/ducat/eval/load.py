"""Models trained elsewhere: ``ducat eval --load MODULE:FUNCTION`` evaluates the model a Python function returns,
as RobustBench's model constructors do.

The function takes no arguments and returns either a C-class ``nn.Module`` mapping [0,1] inputs
``(B, C_in, H, W)`` to logits ``(B, C)``, or ``(module, dummy_index)`` for a dummy-class model with 2C outputs,
``dummy_index`` ``(C,)`` the dummy class of each class (a permutation of [C, 2C); ``C + k`` for the DUCAT
authors' layout), or a :class:`~ducat.dummy.DummyClassModel`. A 2C model is wrapped as a
:class:`~ducat.dummy.DummyClassModel`, so both protocols and the worst case run on it as on a ducat checkpoint.
``MODULE`` is a module importable from the current directory or a path to a ``.py`` file. Provenance records
the function and a SHA-256 of the file that defines it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ducat.attacks import eval_mode
from ducat.config import ConfigError
from ducat.data import dataset_info
from ducat.dummy import DummyClassModel
from ducat.provenance import file_sha256


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def import_module(name: str) -> ModuleType:
    """The module ``name`` (dotted, importable from the current directory) or the ``.py`` file ``name``."""
    try:
        if name.endswith(".py"):
            path = Path(name)
            if not path.is_file():
                raise ConfigError(f"--load: no such file '{name}'")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        sys.path.insert(0, str(Path.cwd()))
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(str(Path.cwd()))
    except ConfigError:
        raise
    except Exception as exc:  # the module's own code may raise anything while it is imported
        raise ConfigError(f"--load: cannot import '{name}' ({_first_line(exc)})") from None


def load_function(spec: str, dataset: str | None) -> tuple[nn.Module, str, None, dict[str, Any]]:
    """(model, dataset, None, provenance facts) for ``--load MODULE:FUNCTION`` on ``dataset``: the function's
    return value checked against the dataset's classes (:func:`as_evaluable`). ConfigError on any problem."""
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise ConfigError(f"--load must be MODULE:FUNCTION, got '{spec}'")
    if dataset is None:
        raise ConfigError("--load needs --dataset (the test split and the number of classes come from it)")
    info = dataset_info(dataset)
    function = getattr(import_module(module_name), function_name, None)
    if not callable(function):
        raise ConfigError(f"--load {spec}: '{module_name}' has no function '{function_name}'")
    try:
        returned = function()
    except Exception as exc:
        raise ConfigError(f"--load {spec}: {function_name}() raised {_first_line(exc)}") from None
    model = as_evaluable(returned, info.num_classes, (1, info.in_channels, info.image_size, info.image_size), spec)
    source = Path(inspect.getsourcefile(function) or sys.modules[function.__module__].__file__)
    return model, info.name, None, {"function": spec, "module_file": str(source), "sha256": file_sha256(source)}


def as_evaluable(returned: Any, classes: int, input_shape: tuple[int, ...], source: str) -> nn.Module:
    """``returned`` as a model ``evaluate`` takes: a C-class module as it is, ``(module, dummy_index)`` with 2C
    outputs as a :class:`~ducat.dummy.DummyClassModel`. ConfigError (naming ``source``) for anything else."""
    module, dummy_index = returned if isinstance(returned, tuple) and len(returned) == 2 else (returned, None)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{source} returned {type(returned).__name__}, not an nn.Module or (nn.Module, "
                          "dummy_index)")
    width = _output_width(module, input_shape, source)
    if isinstance(module, DummyClassModel) and dummy_index is None and module.num_classes == classes:
        return module
    if width == classes and dummy_index is None and not isinstance(module, DummyClassModel):
        return module
    if width == 2 * classes and dummy_index is not None:
        pairing = _pairing(dummy_index, classes, source)
        return DummyClassModel(module, pairing)
    raise ConfigError(f"{source} returned a model with {width} outputs" + (" and a dummy_index" if dummy_index
                      is not None else "") + f"; the dataset has {classes} classes: expected a {classes}-output "
                      f"classifier, or ({2 * classes}-output module, dummy_index)")


def _output_width(module: nn.Module, input_shape: tuple[int, ...], source: str) -> int:
    """The number of logits ``module`` returns for one zero input of ``input_shape`` (eval mode, mode restored)."""
    param = next(module.parameters(), None)
    x = torch.zeros(input_shape) if param is None else param.new_zeros(input_shape)
    try:
        with torch.no_grad(), eval_mode(module):
            out = module(x)
    except Exception as exc:
        raise ConfigError(f"{source}: the model fails on an input of shape {input_shape} ({_first_line(exc)})") \
            from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        raise ConfigError(f"{source}: the model must return logits (B, K), got "
                          f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    return out.shape[1]


def _pairing(dummy_index: Any, classes: int, source: str) -> torch.Tensor:
    """``dummy_index`` as a ``(C,)`` int64 tensor, or ConfigError unless it is a permutation of [C, 2C)."""
    try:
        pairing = torch.as_tensor(dummy_index).long().flatten().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{source}: dummy_index is not a list of class indices ({_first_line(exc)})") from None
    if pairing.numel() != classes or not torch.equal(pairing.sort().values, torch.arange(classes, 2 * classes)):
        raise ConfigError(f"{source}: dummy_index must pair each of the {classes} classes with its own dummy class, "
                          f"a permutation of [{classes}, {2 * classes}); got {pairing.tolist()[:12]}")
    return pairing
