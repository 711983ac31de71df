"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint is a ``torch.save`` dict holding only tensors, numbers, strings, lists and dicts
(so ``torch.load(..., weights_only=True)`` reads it; a pickle that would import anything else is
refused before it runs). The config travels as JSON text. Writes go to a temporary file in the
same directory, are fsynced, then renamed over the target, so a crash leaves either the old or
the new file, never a torn one; the previous checkpoint is kept as ``prev.pt``. A SHA-256 of the
bytes is stored in a sidecar ``<name>.sha256`` and checked on load.

Test hook: with ``DUCAT_TEST_CRASH_AT=<point>:<file name>[@<n>]`` in the environment the process
SIGKILLs itself the n-th time (default 1st) a write reaches that point, e.g.
``temp-written:last.pt@2`` (the temporary copy of the 2nd ``last.pt`` is complete and fsynced, not
yet renamed) or ``replaced:last.pt.sha256`` (the new checksum is in place, the data not yet). Points:
``temp-written`` and ``replaced`` in every atomic write. Unset (always, outside tests), it costs one
environment lookup per write. Used by ``tests/test_reliability.py`` and ``benchmarks/crash_resume.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import signal
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT_VERSION = 1
CRASH_ENV = "DUCAT_TEST_CRASH_AT"
_crash_hits: dict[str, int] = {}


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted, unsafe or does not fit; the message is one line."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def crash_point(point: str, name: str) -> None:
    """Test hook (see the module docstring): SIGKILL this process here if ``DUCAT_TEST_CRASH_AT`` says so."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    label = f"{point}:{name}"
    wanted, _, nth = spec.partition("@")
    if wanted != label:
        return
    _crash_hits[label] = _crash_hits.get(label, 0) + 1
    if _crash_hits[label] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        crash_point("temp-written", path.name)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    crash_point("replaced", path.name)
    _fsync_dir(path.parent)


def save_checkpoint(state: dict[str, Any], path: Path, keep_previous: bool = True) -> str:
    """Atomically write ``state`` to ``path`` (and its checksum); returns the SHA-256 hex digest.

    With ``keep_previous`` the file it replaces is kept as ``prev.pt`` beside it."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    if keep_previous and path.exists():
        previous = path.with_name("prev.pt")
        atomic_write_bytes(previous.with_name("prev.pt.sha256"), _read_sidecar(path).encode())
        tmp_link = previous.with_name(".prev.pt.link")
        tmp_link.unlink(missing_ok=True)
        os.link(path, tmp_link)
        os.replace(tmp_link, previous)
    # The sidecar names the digest of the new file; write it first so that after a crash between
    # the two renames the pair disagrees and load_checkpoint reports it instead of trusting it.
    sidecar = path.with_name(path.name + ".sha256")
    old_digest = _read_sidecar(path) if path.exists() else ""
    atomic_write_bytes(sidecar, digest.encode())
    try:
        atomic_write_bytes(path, data)
    except OSError:
        # The data write failed (disk full, ...) and the old file is still in place: give it back its
        # own checksum so that it stays loadable. Best effort: the fallback to prev.pt covers a failure.
        try:
            if old_digest:
                atomic_write_bytes(sidecar, old_digest.encode())
            else:
                sidecar.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    return digest


def _read_sidecar(path: Path) -> str:
    sidecar = path.with_name(path.name + ".sha256")
    return sidecar.read_text().strip() if sidecar.exists() else ""


def load_checkpoint(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``); CheckpointError on any problem.

    Accepts ducat checkpoints and plain state dicts (``{name: tensor}``) such as those of other
    tools; ``.safetensors`` files are read with safetensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return {"model": load_file(str(path))}
        except Exception as exc:  # safetensors raises several types for bad files
            raise CheckpointError(f"checkpoint '{path}' is not a valid safetensors file ({exc})") from None
    data = path.read_bytes()
    expected = _read_sidecar(path)
    if verify and expected and hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"checkpoint '{path}' is corrupted (SHA-256 differs from {path.name}.sha256)"
                              + _last_good_hint(path))
    try:
        with warnings.catch_warnings():  # torch warns on stderr about some pickles it then refuses
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"checkpoint '{path}' was refused: it holds objects other than tensors and "
                              f"plain data, which could run code ({_unpickler_reason(exc)})") from None
    except Exception as exc:
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160] if str(exc) else 'truncated?'})"
                              + _last_good_hint(path)) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(state).__name__}, not a dict")
    if "model" not in state:
        if all(isinstance(v, torch.Tensor) for v in state.values()):
            return {"model": state}
        for key in ("state_dict", "model_state_dict", "net"):
            if isinstance(state.get(key), dict):
                return {**state, "model": state[key]}
        raise CheckpointError(f"checkpoint '{path}' has no model weights (no 'model' or 'state_dict' key)")
    return state


def _unpickler_reason(exc: Exception) -> str:
    """The informative line of torch's weights-only refusal (it is wrapped in boilerplate)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)]
    return (useful or lines or ["unsafe content"])[0][:200]


def _last_good_hint(path: Path) -> str:
    previous = path.with_name("prev.pt")
    if previous.is_file() and previous != path:
        return f"; the previous checkpoint is '{previous}'"
    return ""


def checkpoint_config(state: dict[str, Any]) -> dict[str, Any] | None:
    """The run config saved in a ducat checkpoint, or None for foreign checkpoints."""
    text = state.get("config")
    return json.loads(text) if isinstance(text, str) else None


def classifier_outputs(weights: dict[str, torch.Tensor]) -> int:
    """Output count of the last linear layer in a state dict (the last 2-D ``*weight``)."""
    mats = [v for k, v in weights.items() if k.endswith("weight") and v.dim() == 2]
    if not mats:
        raise CheckpointError("checkpoint has no linear layer weights")
    return mats[-1].shape[0]


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(weights)`` with a one-line error when shapes or names differ."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint '{source}' does not fit the model: {len(missing)} missing keys "
                              f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for key, value in weights.items():
        if own[key].shape != value.shape:
            raise CheckpointError(f"checkpoint '{source}' does not fit the model: '{key}' has shape "
                                  f"{tuple(value.shape)}, the model expects {tuple(own[key].shape)}")
    model.load_state_dict(weights)
