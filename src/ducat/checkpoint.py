"""Checkpoints: written atomically, read without unpickling arbitrary objects or unbounded memory.

A checkpoint is a ``torch.save`` dict holding only tensors, numbers, strings, lists and dicts
(so ``torch.load(..., weights_only=True)`` reads it; a pickle that would import anything else is
refused before it runs). The config travels as JSON text. Every file goes through
:func:`ducat.fileio.atomic_write_bytes` (temporary file, fsync, rename), so a crash leaves either the
old or the new file, never a torn one; the previous checkpoint is kept as ``prev.pt``. A SHA-256 of the
bytes is stored in a sidecar ``<name>.sha256`` and checked on load. The crash test hook
(``DUCAT_TEST_CRASH_AT``) lives in :mod:`ducat.fileio`.

Size limit. Before a tensor is read, :func:`load_checkpoint` bounds what the file may make it allocate:
the file size, and for torch's zip format the total uncompressed size its entries declare (a 1 MB file
can declare a 1 GiB deflate-compressed storage, which torch would inflate). The limit is the caller's
``max_bytes`` -- typically :func:`checkpoint_size_limit` of the model the weights go into -- or else a
default cap of ``DEFAULT_MAX_CHECKPOINT_MB`` = 1024 MiB, overridable with ``DUCAT_MAX_CHECKPOINT_MB``: about
twice the bound of the largest shipped model (``docs/reliability.md``, "Checkpoint size limit"), and small
enough for any machine that trains one. Entries are not refused for their compression ratio: ``torch.save``
never compresses, a re-compressed genuine checkpoint with zero-filled tensors (fresh momentum buffers,
zero-initialised dummy rows) would fail any ratio rule, and the size limit already bounds the memory
whatever the ratio. torch's reader allocates each entry from its declared size and fails on an entry
that inflates beyond it, so the declared sizes are what it can allocate.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load
from torch import nn

from ducat.errors import CheckpointError
from ducat.fileio import CRASH_ENV, atomic_write_bytes, crash_point, temp_path  # noqa: F401 (re-exported)

FORMAT_VERSION = 1
MAX_CHECKPOINT_ENV = "DUCAT_MAX_CHECKPOINT_MB"
DEFAULT_MAX_CHECKPOINT_MB = 1024
LIMIT_MARGIN_BYTES = 16 * 2**20  # config JSON, RNG states, pickle and zip metadata of a ducat checkpoint
_ZIP_MAGIC = b"PK\x03\x04"  # how torch.load tells its zip format from the legacy pickle format
_MiB = 2**20




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
        tmp_link = temp_path(previous, "link")
        os.link(path, tmp_link)
        try:
            os.replace(tmp_link, previous)
        except OSError:
            tmp_link.unlink(missing_ok=True)
            raise
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


def checkpoint_size_limit(model: nn.Module) -> int:
    """Bytes a checkpoint for ``model`` may declare: 3 x its parameter and buffer bytes + 16 MiB.

    A ducat training checkpoint holds the weights (1x) and SGD's momentum buffers (1x); the third
    share leaves room for a wider DUCAT head and for foreign checkpoints with two optimizer moments
    (Adam); the margin covers the config, RNG states and pickle/zip metadata."""
    tensors = [*model.parameters(), *model.buffers()]
    return 3 * sum(t.numel() * t.element_size() for t in tensors) + LIMIT_MARGIN_BYTES


def default_size_limit() -> int:
    """The cap used when no ``max_bytes`` is given: ``DUCAT_MAX_CHECKPOINT_MB`` MiB, default 1024."""
    text = os.environ.get(MAX_CHECKPOINT_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_CHECKPOINT_MB * _MiB
    try:
        mib = float(text)
    except ValueError:
        mib = math.nan
    if not (math.isfinite(mib) and mib > 0):
        raise CheckpointError(f"{MAX_CHECKPOINT_ENV} must be a positive number of MiB, got {text!r}")
    return int(mib * _MiB)


def load_checkpoint(path: str | Path, verify: bool = True, max_bytes: int | None = None) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``, bounded size); CheckpointError on any problem.

    Accepts ducat checkpoints and plain state dicts (``{name: tensor}``) such as those of other
    tools; ``.safetensors`` files are read with safetensors. ``max_bytes`` bounds the bytes the file
    may hold or declare (see the module docstring); None = the default cap."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    limit = max_bytes if max_bytes is not None else default_size_limit()
    data = _read_bounded(path, limit, max_bytes is not None)
    if path.suffix == ".safetensors":
        return {"model": _load_safetensors(data, path)}
    expected = _read_sidecar(path)
    if verify and expected and hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"checkpoint '{path}' is corrupted (SHA-256 differs from {path.name}.sha256)"
                              + _last_good_hint(path))
    if data.startswith(_ZIP_MAGIC):  # the legacy format stores tensors raw: its size is bounded above
        _check_zip_declared_size(data, path, limit, max_bytes is not None)
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
    return _with_model_weights(state, path)


def _with_model_weights(state: Any, path: Path) -> dict[str, Any]:
    """``state`` with its weights under ``"model"`` (foreign layouts mapped); CheckpointError if none."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(state).__name__}, not a dict")
    if "model" not in state:
        if state and all(isinstance(v, torch.Tensor) for v in state.values()):
            state = {"model": state}
        else:
            key = next((k for k in ("state_dict", "model_state_dict", "net") if isinstance(state.get(k), dict)), None)
            if key is None:
                raise CheckpointError(f"checkpoint '{path}' has no model weights (no 'model' or 'state_dict' key)")
            state = {**state, "model": state[key]}
    if not _is_weights(state["model"]):
        raise CheckpointError(f"checkpoint '{path}' has no model weights (its 'model' entry is not a mapping "
                              "of names to tensors)")
    return state


def _is_weights(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in value.items())


def _too_big(path: Path, what: str, size: int, limit: int, limit_from_caller: bool) -> CheckpointError:
    how = ("the bound for the model it is loaded into: 3 x its parameters and buffers + 16 MiB"
           if limit_from_caller else f"raise it with {MAX_CHECKPOINT_ENV}=<MiB> if you trust the file")
    return CheckpointError(f"checkpoint '{path}' was refused: it {what} {size / _MiB:.1f} MiB, more than the "
                           f"limit of {limit / _MiB:.1f} MiB ({how})")


def _read_bounded(path: Path, limit: int, limit_from_caller: bool) -> bytes:
    """The file's bytes, refused before reading if the file is larger than ``limit``."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise _too_big(path, "is", size, limit, limit_from_caller)
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({exc.strerror})") from None
    if len(data) > limit:  # grew since stat
        raise _too_big(path, "is", len(data), limit, limit_from_caller)
    return data


def _check_zip_declared_size(data: bytes, path: Path, limit: int, limit_from_caller: bool) -> None:
    """Refuse a zip checkpoint whose entries declare more uncompressed bytes than ``limit`` (nothing inflated)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as exc:
        raise CheckpointError(f"checkpoint '{path}' cannot be read (not a complete zip archive: "
                              f"{str(exc).splitlines()[0][:120] if str(exc) else 'truncated?'})"
                              + _last_good_hint(path)) from None
    if declared > limit:
        raise _too_big(path, "declares", declared, limit, limit_from_caller)


def _load_safetensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, after checking that its header describes the bytes it has.

    Format: 8 bytes little-endian header length n, n bytes of JSON ``{name: {dtype, shape, data_offsets:
    [begin, end]}, "__metadata__": {...}}``, then the data. A header claiming more bytes than the file
    holds is refused before safetensors parses it (the file's size is already within the limit)."""
    invalid = f"checkpoint '{path}' is not a valid safetensors file"
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < n <= len(data) - 8:
        raise CheckpointError(f"{invalid} (its header length does not fit the {len(data)}-byte file)")
    try:
        header = json.loads(data[8:8 + n])
        spans = [entry["data_offsets"] for key, entry in header.items() if key != "__metadata__"]
        declared = sum(end - begin for begin, end in spans)
    except (ValueError, RecursionError, TypeError, KeyError, AttributeError):
        raise CheckpointError(f"{invalid} (its header is not a JSON table of tensors)") from None
    if declared > len(data) - 8 - n:
        raise CheckpointError(f"{invalid} (its header declares {declared} bytes of tensors, the file holds "
                              f"{len(data) - 8 - n})")
    try:
        return load(data)
    except Exception as exc:  # safetensors raises several types for bad files
        raise CheckpointError(f"{invalid} ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})"
                              ) from None


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


def checkpoint_config(state: dict[str, Any], path: str | Path | None = None) -> dict[str, Any] | None:
    """The run config saved in a ducat checkpoint (a mapping of config sections), or None for foreign
    checkpoints (no ``config`` text); CheckpointError naming ``path`` if the text is not such a mapping."""
    text = state.get("config")
    if not isinstance(text, str):
        return None
    where = f"checkpoint '{path}'" if path is not None else "the checkpoint"
    try:
        mapping = json.loads(text)
    except RecursionError:
        raise CheckpointError(f"{where} holds a config that is nested too deeply to be a ducat config") from None
    except ValueError:
        raise CheckpointError(f"{where} holds a config that is not valid JSON") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, dict) for v in mapping.values()):
        raise CheckpointError(f"{where} holds a config that is not a mapping of config sections")
    return mapping


def check_training_state(state: dict[str, Any], path: str | Path) -> None:
    """Check that ``state`` (from :func:`load_checkpoint`) holds what a resume needs, with the right types.

    ``model``: {name: tensor}; ``optimizer``: {state: dict, param_groups: [dict]}; ``rng``: {generator: uint8
    tensor, and optionally torch: uint8 tensor of the CPU generator's size}; ``epoch``: int >= 0; ``best_epoch``: int in
    [0, epoch]; ``best_metric``: a number, not NaN (-inf before any eligible epoch); ``config``: JSON text of
    a mapping of config sections. CheckpointError naming ``path`` and the first bad entry otherwise."""
    problem = _training_state_problem(state)
    if problem:
        raise CheckpointError(f"checkpoint '{path}' cannot be resumed from: {problem}")
    checkpoint_config(state, path)


def _training_state_problem(state: dict[str, Any]) -> str | None:
    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    def is_bytes_tensor(x: Any) -> bool:
        return isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 1

    optimizer, rng, epoch, best_epoch = (state.get(k) for k in ("optimizer", "rng", "epoch", "best_epoch"))
    metric = state.get("best_metric")
    if not _is_weights(state.get("model")):
        return "'model' is not a mapping of names to tensors"
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)
            and all(isinstance(g, dict) for g in optimizer["param_groups"])):
        return "'optimizer' is not an optimizer state (a mapping with 'state' and a list of 'param_groups')"
    global_state = rng.get("torch") if isinstance(rng, dict) else None  # older checkpoints also hold this one
    if not (isinstance(rng, dict) and is_bytes_tensor(rng.get("generator")) and (global_state is None or (
            is_bytes_tensor(global_state) and global_state.numel() == torch.get_rng_state().numel()))):
        return "'rng' does not hold the 'generator' random state (and optional 'torch' state) as byte tensors"
    if not (is_int(epoch) and epoch >= 0):
        return "'epoch' is not an integer >= 0"
    if not (is_int(best_epoch) and 0 <= best_epoch <= epoch):
        return f"'best_epoch' is not an integer in [0, {epoch}]"
    if not (isinstance(metric, (int, float)) and not isinstance(metric, bool) and not math.isnan(metric)):
        return "'best_metric' is not a number"
    if not isinstance(state.get("config"), str):
        return "'config' is missing or not JSON text"
    return None


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
