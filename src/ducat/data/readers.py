"""Readers of each dataset's real on-disk format, returning whole splits as uint8 tensors.

Nothing is ever synthesised: a missing or malformed file raises :class:`DataError` naming the
path(s) searched or the bad file, and how to obtain the data.

* ``digits``: scikit-learn's ``load_digits()`` (1797 8x8 images, values 0..16, scaled to uint8 with
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
* ``TinyImageNet``: ``root/tiny-imagenet-200/`` or ``root/tiny-imagenet-200.zip`` (read in place).
  Labels are indices into ``sorted(wnids.txt)``; ``train=False`` is the labelled ``val`` split.
  Decoding 100k JPEGs takes a while, so the decoded arrays are cached as
  ``tiny-imagenet-200.{train,val}.npz`` next to the data (written atomically via a temporary file
  and ``os.replace``; skipped with a warning if the directory is read-only). The cache is rebuilt
  when the zip's (or the extracted ``wnids.txt``'s) path, size or mtime change; delete it to force.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import pickle
import struct
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ducat.data.base import DataError, TensorData, canonical_name

FASHION_MNIST_SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
DIGITS_TRAIN_SIZE = 1437


def load_split(name: str, root: str | Path | None, train: bool) -> TensorData:
    """Load the train (``train=True``) or test split of dataset ``name`` as CPU tensors."""
    canonical = canonical_name(name)
    root_path = None if root is None or str(root) == "" else Path(root).expanduser()
    return _LOADERS[canonical](root_path, bool(train))


def _tensors(images: np.ndarray, labels: np.ndarray) -> TensorData:
    return TensorData(torch.from_numpy(np.require(images, np.uint8, ["C", "W"])),
                      torch.from_numpy(np.require(labels, np.int64, ["C", "W"])))


def _need_root(name: str, root: Path | None, how: str) -> Path:
    if root is None:
        raise DataError(f"{name} needs a data root (data.root / root=...) holding its files; {how}")
    return root


# ---- digits ------------------------------------------------------------------------------------
def _load_digits(root: Path | None, train: bool) -> TensorData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    order = np.random.RandomState(0).permutation(len(images))
    idx = order[:DIGITS_TRAIN_SIZE] if train else order[DIGITS_TRAIN_SIZE:]
    return _tensors(images[idx], digits.target[idx])


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
            return _tensors(images[:, None], labels)
    searched = ", ".join(str(d) for d in dirs)
    raise DataError(f"FashionMNIST not found (looked for {stems[0]}[.gz] and {stems[1]}[.gz] in {searched}); "
                    f"{_FMNIST_HOW}")


# ---- CIFAR-10 / CIFAR-100 (python pickle batches) ----------------------------------------------
@functools.lru_cache(maxsize=None)
def _numpy_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core.multiarray import _reconstruct
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
    root = _need_root(name, root, how)
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
    return _tensors(images, labels)


# ---- Tiny-ImageNet (zip or extracted directory of JPEGs) ---------------------------------------
_TINY_DIR, _TINY_ZIP = "tiny-imagenet-200", "tiny-imagenet-200.zip"
_TINY_HOW = ("download tiny-imagenet-200.zip from http://cs231n.stanford.edu/tiny-imagenet-200.zip on a "
             "machine with internet and put it (or its extracted directory) under the data root")
_CACHE_VERSION = 1


class _TinySource:
    """Uniform read access to the dataset's files, by path relative to the ``tiny-imagenet-200`` top."""

    def __init__(self, path: Path):
        self.path = path
        self.zip: zipfile.ZipFile | None = None
        self.prefix = ""
        if path.is_file():
            try:
                self.zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataError(f"cannot open {path} as a zip file: {exc}") from None
            tops = [n[: -len("wnids.txt")] for n in self.zip.namelist() if n.endswith("wnids.txt")
                    and (n == "wnids.txt" or n.endswith("/wnids.txt"))]
            if not tops:
                raise DataError(f"{path} has no wnids.txt; it is not the Tiny-ImageNet zip; {_TINY_HOW}")
            self.prefix = min(tops, key=len)
            self._names = set(self.zip.namelist())

    def signature(self) -> str:
        stat = (self.path / "wnids.txt" if self.zip is None else self.path).stat()
        return f"v{_CACHE_VERSION}:{self.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"

    def describe(self, rel: str) -> str:
        return f"{self.path}:{self.prefix}{rel}" if self.zip is not None else str(self.path / rel)

    def read(self, rel: str) -> bytes:
        try:
            if self.zip is not None:
                return self.zip.read(self.prefix + rel)
            return (self.path / rel).read_bytes()
        except (KeyError, OSError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"cannot read {self.describe(rel)}: {exc}") from None

    def list_dir(self, rel: str) -> list[str]:
        """Sorted file names directly inside directory ``rel``."""
        if self.zip is not None:
            start = self.prefix + rel.rstrip("/") + "/"
            return sorted({n[len(start):] for n in self._names
                           if n.startswith(start) and "/" not in n[len(start):] and n != start})
        directory = self.path / rel
        if not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir() if p.is_file())

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def _decode_jpeg(data: bytes, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - PIL raises assorted types for bad images
        raise DataError(f"cannot decode image {where}: {exc}") from None
    if arr.shape != (64, 64, 3):
        raise DataError(f"{where} is {arr.shape[1]}x{arr.shape[0]}, expected a 64x64 Tiny-ImageNet image")
    return arr.transpose(2, 0, 1)


def _decode_tiny(source: _TinySource, train: bool) -> tuple[np.ndarray, np.ndarray]:
    wnids = sorted({w.strip() for w in source.read("wnids.txt").decode("utf-8").splitlines() if w.strip()})
    index = {w: i for i, w in enumerate(wnids)}
    items: list[tuple[str, int]] = []
    if train:
        for w in wnids:
            names = [n for n in source.list_dir(f"train/{w}/images") if n.lower().endswith((".jpeg", ".jpg"))]
            if not names:
                raise DataError(f"no training images in {source.describe(f'train/{w}/images')}; {_TINY_HOW}")
            items += [(f"train/{w}/images/{n}", index[w]) for n in names]
    else:
        listing = "val/val_annotations.txt"
        for lineno, line in enumerate(source.read(listing).decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise DataError(f"{source.describe(listing)} line {lineno}: expected 'filename<TAB>wnid...' "
                                f"with a wnid from wnids.txt, got {line.strip()[:80]!r}")
            items.append((f"val/images/{fields[0]}", index[fields[1]]))
    images = np.empty((len(items), 3, 64, 64), dtype=np.uint8)
    labels = np.empty(len(items), dtype=np.int64)
    for i, (rel, label) in enumerate(items):
        images[i] = _decode_jpeg(source.read(rel), source.describe(rel))
        labels[i] = label
    return images, labels


def _read_cache(path: Path, signature: str) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as cached:
            if str(cached["signature"]) != signature:
                return None
            images, labels = cached["images"], cached["labels"]
    except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
        return None
    if images.dtype != np.uint8 or images.shape[1:] != (3, 64, 64) or labels.shape != (len(images),):
        return None
    return images, labels.astype(np.int64, copy=False)


def _write_cache(path: Path, images: np.ndarray, labels: np.ndarray, signature: str) -> None:
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images, labels=labels, signature=np.array(signature))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        warnings.warn(f"could not cache decoded Tiny-ImageNet at {path}: {exc}", stacklevel=3)


def _load_tiny_imagenet(root: Path | None, train: bool) -> TensorData:
    root = _need_root("TinyImageNet", root, _TINY_HOW)
    candidates = [root / _TINY_DIR, root / _TINY_ZIP, root]
    found = None
    for candidate in candidates:
        if (candidate.is_dir() and (candidate / "wnids.txt").is_file()) or (
                candidate.suffix == ".zip" and candidate.is_file()):
            found = candidate
            break
    if found is None:
        raise DataError(f"TinyImageNet not found under {root} (looked for {root / _TINY_DIR}/wnids.txt and "
                        f"{root / _TINY_ZIP}); {_TINY_HOW}")
    cache_dir = found if found == root and found.is_dir() else found.parent
    cache = cache_dir / f"{_TINY_DIR}.{'train' if train else 'val'}.npz"
    source = _TinySource(found)
    try:
        signature = source.signature()
        cached = _read_cache(cache, signature)
        if cached is not None:
            return _tensors(*cached)
        images, labels = _decode_tiny(source, train)
    finally:
        source.close()
    _write_cache(cache, images, labels, signature)
    return _tensors(images, labels)


_LOADERS: dict[str, Callable[[Path | None, bool], TensorData]] = {
    "digits": _load_digits,
    "FashionMNIST": _load_fashion_mnist,
    "CIFAR10": lambda root, train: _load_cifar("CIFAR10", root, train),
    "CIFAR100": lambda root, train: _load_cifar("CIFAR100", root, train),
    "TinyImageNet": _load_tiny_imagenet,
}
