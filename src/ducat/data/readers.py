"""Readers of each dataset's real on-disk format, returning whole splits as uint8 tensors.

Nothing is ever synthesised: a missing or malformed file raises :class:`DataError` naming the
path(s) searched or the bad file, and how to obtain the data.

* ``digits``: scikit-learn's digits (``load_digits()``'s file; 1797 8x8 images, values 0..16, scaled to uint8 with
  ``round(v * 255 / 16)``). ``root`` is ignored. The train/test split is fixed: the indices are
  permuted with ``numpy.random.RandomState(0)`` (the legacy generator, whose stream numpy keeps
  stable across versions); the first 1437 (80%) are train, the remaining 360 test.
* ``FashionMNIST``: the idx files (gzip-compressed or not), parsed here with numpy. Searched in
  ``root`` (flat), ``root/FashionMNIST/raw`` (torchvision's layout), then
  ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package).
* ``CIFAR10`` / ``CIFAR100``: the official python pickle batches (``root/cifar-10-batches-py`` /
  ``root/cifar-100-python``, or the downloaded ``.tar.gz`` read without extracting). torchvision's
  own class is not used because it insists on the md5 sums of the original files; instead the
  batches are read with a restricted unpickler that only resolves the few numpy globals an array
  needs and refuses every other global, so a tampered file cannot run code.
* ``TinyImageNet``: see :mod:`ducat.data.tinyimagenet`.
"""

from __future__ import annotations

import functools
import gzip
import io
import pickle
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from ducat.data.base import DataError, TensorData, canonical_name, need_root, tensor_data
from ducat.data.tinyimagenet import load_tiny_imagenet

FASHION_MNIST_SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
DIGITS_TRAIN_SIZE = 1437


def load_split(name: str, root: str | Path | None, train: bool) -> TensorData:
    """Load the train (``train=True``) or test split of dataset ``name`` as CPU tensors."""
    canonical = canonical_name(name)
    root_path = None if root is None or str(root) == "" else Path(root).expanduser()
    return _LOADERS[canonical](root_path, bool(train))


# ---- digits ------------------------------------------------------------------------------------
def _load_digits(root: Path | None, train: bool) -> TensorData:
    values, labels = _digits_csv()
    images = np.rint(values.reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)  # (1797, 1, 8, 8)
    order = np.random.RandomState(0).permutation(len(images))
    idx = order[:DIGITS_TRAIN_SIZE] if train else order[DIGITS_TRAIN_SIZE:]
    return tensor_data(images[idx], labels[idx])


def _digits_csv() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, ``(1797, 64)`` values 0..16 and ``(1797,)`` labels, read from the file it ships
    (``sklearn/datasets/data/digits.csv.gz``, one row of 64 pixels and the label per image) without importing
    scikit-learn, which takes about a second; through ``load_digits()`` if that file is not where it was."""
    import importlib.util  # finds sklearn without importing it

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits  # about a second to import: the fallback only

        digits = load_digits()
        return digits.data, digits.target
    table = np.loadtxt(io.BytesIO(_read_bytes(path)), delimiter=",", dtype=np.float64)
    return table[:, :-1], table[:, -1].astype(np.int64)


# ---- Fashion-MNIST (idx files) -----------------------------------------------------------------
_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 2051, 2049
_FMNIST_HOW = ("install it with 'apt-get install -y dataset-fashion-mnist', or download it with "
               "torchvision.datasets.FashionMNIST(root, download=True) on a machine with internet")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc} (truncated or corrupt file?)") from None


def read_idx(path: str | Path, expect_magic: int) -> np.ndarray:
    """Parse an idx file (``.gz`` or not) of unsigned bytes; images ``(N, rows, cols)`` or labels ``(N,)``."""
    path = Path(path)
    data = _read_bytes(path)
    ndim = {_IDX_IMAGES_MAGIC: 3, _IDX_LABELS_MAGIC: 1}[expect_magic]
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise DataError(f"{path} is truncated: {len(data)} bytes, shorter than its idx header")
    magic, *dims = struct.unpack(f">{1 + ndim}i", data[:header])
    if magic != expect_magic:
        raise DataError(f"{path} is not an idx {'image' if ndim == 3 else 'label'} file "
                        f"(magic number {magic}, expected {expect_magic})")
    expected = int(np.prod(dims, dtype=np.int64))
    if min(dims) < 0 or len(data) - header != expected:
        raise DataError(f"{path} has {len(data) - header} data bytes but its header {tuple(dims)} needs "
                        f"{expected} (truncated or wrong-shape file)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_fashion_mnist(root: Path | None, train: bool) -> TensorData:
    prefix = "train" if train else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    dirs = ([root, root / "FashionMNIST" / "raw"] if root is not None else []) + list(FASHION_MNIST_SYSTEM_DIRS)
    for directory in dirs:
        found = [_find_idx(directory, stem) for stem in stems]
        if all(found):
            images = read_idx(found[0], _IDX_IMAGES_MAGIC)
            labels = read_idx(found[1], _IDX_LABELS_MAGIC)
            if len(images) != len(labels):
                raise DataError(f"{found[0]} holds {len(images)} images but {found[1]} holds {len(labels)} labels")
            if images.shape[1:] != (28, 28):
                raise DataError(f"{found[0]} holds {images.shape[1]}x{images.shape[2]} images, expected 28x28")
            if len(labels) and labels.max() > 9:
                raise DataError(f"{found[1]} holds label {labels.max()}, expected 0..9")
            return tensor_data(images[:, None], labels)
    searched = ", ".join(str(d) for d in dirs)
    raise DataError(f"FashionMNIST not found (looked for {stems[0]}[.gz] and {stems[1]}[.gz] in {searched}); "
                    f"{_FMNIST_HOW}")


# ---- CIFAR-10 / CIFAR-100 (python pickle batches) ----------------------------------------------
@functools.lru_cache(maxsize=None)
def _numpy_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2 names; numpy 1's below
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
        from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{module}.numeric", "_frombuffer")] = _frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR batches: containers, strings and numbers plus numpy arrays; any other
    global (``os.system``, ``builtins.eval``, ...) is refused before it can be called."""

    def find_class(self, module: str, name: str) -> object:
        obj = _numpy_globals().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a dataset file")
        return obj


def restricted_load(f: io.BufferedIOBase | io.BytesIO, source: str) -> object:
    """Unpickle one dataset batch from ``f`` with :class:`RestrictedUnpickler` (``latin1`` decodes
    Python 2 byte strings, as torchvision does); any failure is a :class:`DataError` naming ``source``."""
    try:
        return RestrictedUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"refusing to load {source}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure of a data file is a data error
        raise DataError(f"cannot unpickle {source}: {type(exc).__name__}: {exc}") from None


_CIFAR = {
    "CIFAR10": ("cifar-10-batches-py", "cifar-10-python.tar.gz", [f"data_batch_{i}" for i in range(1, 6)],
                ["test_batch"], "labels", 10),
    "CIFAR100": ("cifar-100-python", "cifar-100-python.tar.gz", ["train"], ["test"], "fine_labels", 100),
}


def _cifar_batch(obj: object, label_key: str, num_classes: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(obj, dict):
        raise DataError(f"{source} is not a CIFAR batch (a dict), got {type(obj).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in batch or label_key not in batch:
        raise DataError(f"{source} lacks the keys 'data' and '{label_key}' (has {sorted(map(str, batch))})")
    data, labels = batch["data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{source}: 'data' must be a uint8 (N, 3072) array, got {type(data).__name__} {shape}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{source}: '{label_key}' is not a list of integers") from None
    if labels.shape != (len(data),):
        raise DataError(f"{source} holds {len(data)} images but {labels.size} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{source}: labels must be in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(name: str, root: Path | None, train: bool) -> TensorData:
    dirname, archive, train_files, test_files, label_key, num_classes = _CIFAR[name]
    how = (f"download it with torchvision.datasets.{name}(root, download=True) on a machine with internet "
           f"(it creates root/{dirname})")
    root = need_root(name, root, how)
    files = train_files if train else test_files
    parts = []
    directory = next((d for d in (root / dirname, root) if all((d / f).is_file() for f in files)), None)
    if directory is not None:
        for f in files:
            source = str(directory / f)
            try:
                with open(directory / f, "rb") as handle:
                    obj = restricted_load(handle, source)
            except OSError as exc:
                raise DataError(f"cannot read {source}: {exc}") from None
            parts.append(_cifar_batch(obj, label_key, num_classes, source))
    elif (root / archive).is_file():
        location = root / archive
        try:
            with tarfile.open(location, "r:gz") as tar:
                for f in files:
                    member = f"{dirname}/{f}"
                    try:
                        handle = tar.extractfile(member)
                    except KeyError:
                        handle = None
                    if handle is None:
                        raise DataError(f"{location} has no member {member}; {how}")
                    source = f"{location}:{member}"
                    parts.append(_cifar_batch(restricted_load(handle, source), label_key, num_classes, source))
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DataError(f"cannot read {location}: {exc}") from None
    else:
        raise DataError(f"{name} not found under {root} (looked for {root / dirname}/{{{','.join(files)}}} "
                        f"and {root / archive}); {how}")
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return tensor_data(images, labels)


_LOADERS: dict[str, Callable[[Path | None, bool], TensorData]] = {
    "digits": _load_digits,
    "FashionMNIST": _load_fashion_mnist,
    "CIFAR10": lambda root, train: _load_cifar("CIFAR10", root, train),
    "CIFAR100": lambda root, train: _load_cifar("CIFAR100", root, train),
    "TinyImageNet": load_tiny_imagenet,
}
