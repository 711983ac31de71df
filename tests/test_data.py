"""Tests of ducat.data: every reader on its real on-disk format, the split, the loader and augmentation."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ducat.data import (
    DATASET_NAMES,
    DataError,
    TensorData,
    TensorLoader,
    dataset_info,
    load_split,
    random_crop_flip,
    readers,
    split_train_val,
)
from ducat.data.readers import restricted_load

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ---- names and info ----------------------------------------------------------------------------
@pytest.mark.parametrize("alias,canonical", [
    ("digits", "digits"), ("DIGITS", "digits"), ("FashionMNIST", "FashionMNIST"),
    ("fashion-mnist", "FashionMNIST"), ("fmnist", "FashionMNIST"), ("cifar10", "CIFAR10"),
    ("CIFAR100", "CIFAR100"), ("tiny-imagenet", "TinyImageNet"), ("tinyimagenet", "TinyImageNet"),
])
def test_dataset_info_aliases(alias, canonical):
    assert dataset_info(alias).name == canonical


def test_dataset_info_values():
    assert [dataset_info(n).num_classes for n in DATASET_NAMES] == [10, 10, 10, 100, 200]
    assert [dataset_info(n).image_size for n in DATASET_NAMES] == [8, 28, 32, 32, 64]
    for name in DATASET_NAMES:
        info = dataset_info(name)
        assert len(info.mean) == len(info.std) == info.in_channels


def test_unknown_dataset_lists_names():
    with pytest.raises(DataError) as err:
        dataset_info("mnist")
    message = str(err.value)
    assert "mnist" in message and "\n" not in message
    assert all(name in message for name in DATASET_NAMES)
    with pytest.raises(DataError):
        load_split("imagenet", None, train=True)


# ---- Fashion-MNIST -----------------------------------------------------------------------------
@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(),
                    reason=f"{DEBIAN_FMNIST} missing (apt-get install -y dataset-fashion-mnist)")
def test_real_fashion_mnist_from_debian_package():
    train = load_split("FashionMNIST", None, train=True)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the published first labels
    assert abs(train.images.float().mean().item() / 255 - dataset_info("FashionMNIST").mean[0]) < 1e-3
    test = load_split("fmnist", None, train=False)
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(test.labels.bincount(), torch.full((10,), 1000))


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _write_fmnist(directory: Path, prefix: str, images: np.ndarray, labels: np.ndarray, compress: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for stem, blob in ((f"{prefix}-images-idx3-ubyte", _idx_bytes(images, 2051)),
                       (f"{prefix}-labels-idx1-ubyte", _idx_bytes(labels, 2049))):
        if compress:
            with gzip.open(directory / f"{stem}.gz", "wb") as f:
                f.write(blob)
        else:
            (directory / stem).write_bytes(blob)


@pytest.fixture
def no_system_fmnist(monkeypatch):
    monkeypatch.setattr(readers, "FASHION_MNIST_SYSTEM_DIRS", ())


@pytest.mark.parametrize("layout", ["torchvision", "flat-uncompressed"])
def test_fashion_mnist_written_files_read_back(tmp_path, layout, no_system_fmnist):
    rng = np.random.default_rng(0)
    data = {p: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8))
            for p, n in (("train", 7), ("t10k", 3))}
    directory = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    for prefix, (images, labels) in data.items():
        _write_fmnist(directory, prefix, images, labels, compress=layout == "torchvision")
    for train, prefix in ((True, "train"), (False, "t10k")):
        split = load_split("FashionMNIST", tmp_path, train=train)
        assert torch.equal(split.images, torch.from_numpy(data[prefix][0])[:, None])
        assert torch.equal(split.labels, torch.from_numpy(data[prefix][1]).long())


def test_fashion_mnist_user_root_searched_before_system(tmp_path):
    images, labels = np.zeros((2, 28, 28), np.uint8), np.array([3, 4], np.uint8)
    _write_fmnist(tmp_path, "train", images, labels, compress=True)
    assert load_split("FashionMNIST", tmp_path, train=True).labels.tolist() == [3, 4]


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_idx_file_names_the_file(tmp_path, compress, no_system_fmnist):
    images, labels = np.ones((4, 28, 28), np.uint8), np.arange(4, dtype=np.uint8)
    _write_fmnist(tmp_path, "train", images, labels, compress=compress)
    bad = tmp_path / ("train-images-idx3-ubyte.gz" if compress else "train-images-idx3-ubyte")
    blob = bad.read_bytes()
    bad.write_bytes(blob[: len(blob) - 40])
    with pytest.raises(DataError, match=str(bad)):
        load_split("FashionMNIST", tmp_path, train=True)


def test_idx_wrong_magic_and_count_mismatch(tmp_path, no_system_fmnist):
    images, labels = np.ones((4, 28, 28), np.uint8), np.arange(4, dtype=np.uint8)
    _write_fmnist(tmp_path, "train", images, labels, compress=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels, 2051)[:4] + _idx_bytes(labels, 2049)[4:])
    with pytest.raises(DataError, match="magic"):
        load_split("FashionMNIST", tmp_path, train=True)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels[:3], 2049))
    with pytest.raises(DataError, match="4 images but .* 3 labels"):
        load_split("FashionMNIST", tmp_path, train=True)


def test_fashion_mnist_missing_names_paths(tmp_path, no_system_fmnist):
    with pytest.raises(DataError) as err:
        load_split("FashionMNIST", tmp_path, train=True)
    message = str(err.value)
    assert str(tmp_path) in message and str(tmp_path / "FashionMNIST" / "raw") in message
    assert "dataset-fashion-mnist" in message and "\n" not in message


# ---- digits ------------------------------------------------------------------------------------
def test_digits_shapes_and_fixed_split():
    train, test = load_split("digits", None, train=True), load_split("digits", "/ignored", train=False)
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert train.images.dtype == torch.uint8 and int(train.images.max()) == 255
    assert set(train.labels.unique().tolist()) == set(range(10))
    again = load_split("digits", None, train=True)
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    # train and test together are exactly the 1797 digits (the split is a permutation)
    from sklearn.datasets import load_digits
    full = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    both = torch.cat([train.images, test.images]).flatten(1).numpy()
    assert sorted(map(bytes, both)) == sorted(map(bytes, full.reshape(len(full), -1)))
    # read from scikit-learn's file without importing it: the same images and labels, in the same order
    order = np.random.RandomState(0).permutation(len(full))
    digits = load_digits()
    assert np.array_equal(both, full.reshape(len(full), -1)[order])
    assert np.array_equal(torch.cat([train.labels, test.labels]).numpy(), digits.target[order])


# ---- CIFAR -------------------------------------------------------------------------------------
class _Py2StylePickler(pickle._Pickler):
    """Writes bytes the way Python 2 pickled ``str`` (BINSTRING opcodes), as in the official batches."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _write_batch(path: Path, batch: dict, py2_style: bool) -> None:
    if py2_style:
        buffer = io.BytesIO()
        _Py2StylePickler(buffer, protocol=2).dump(batch)
        # Python 2 era numpy names its module numpy.core (numpy 2 writes numpy._core)
        path.write_bytes(buffer.getvalue().replace(b"numpy._core.", b"numpy.core."))
    else:
        with open(path, "wb") as f:
            pickle.dump(batch, f)


def _cifar_batches(rng, n: int, num_classes: int, label_key: bytes):
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n).tolist()
    return data, labels, {b"batch_label": b"batch", label_key: labels, b"data": data, b"filenames": [b"x.png"] * n}


def test_cifar10_real_format_read_back(tmp_path):
    rng = np.random.default_rng(1)
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    expected = {True: ([], []), False: ([], [])}
    names = [(f"data_batch_{i}", True) for i in range(1, 6)] + [("test_batch", False)]
    for k, (name, train) in enumerate(names):
        data, labels, batch = _cifar_batches(rng, 3 + k, 10, b"labels")
        _write_batch(directory / name, batch, py2_style=k % 2 == 0)
        expected[train][0].append(data)
        expected[train][1].extend(labels)
    for train in (True, False):
        split = load_split("CIFAR10", tmp_path, train=train)
        images = np.concatenate(expected[train][0]).reshape(-1, 3, 32, 32)
        assert torch.equal(split.images, torch.from_numpy(images))
        assert split.labels.tolist() == expected[train][1] and split.labels.dtype == torch.int64
    # the downloaded archive is read in place, without extracting
    archive_root = tmp_path / "archive"
    archive_root.mkdir()
    with tarfile.open(archive_root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(directory, arcname="cifar-10-batches-py")
    from_tar = load_split("CIFAR10", archive_root, train=True)
    assert torch.equal(from_tar.images, load_split("CIFAR10", tmp_path, train=True).images)


def test_cifar100_real_format_read_back(tmp_path):
    rng = np.random.default_rng(2)
    directory = tmp_path / "cifar-100-python"
    directory.mkdir()
    expected = {}
    for name, train in (("train", True), ("test", False)):
        data, labels, batch = _cifar_batches(rng, 6, 100, b"fine_labels")
        batch[b"coarse_labels"] = [label // 5 for label in labels]
        _write_batch(directory / name, batch, py2_style=train)
        expected[train] = (data, labels)
    for train in (True, False):
        split = load_split("CIFAR100", tmp_path, train=train)
        assert torch.equal(split.images, torch.from_numpy(expected[train][0].reshape(-1, 3, 32, 32)))
        assert split.labels.tolist() == expected[train][1]


class _Evil:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_refused_without_executing(tmp_path):
    marker = tmp_path / "pwned"
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    with open(directory / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(f"touch {marker}"), b"labels": []}, f)
    with pytest.raises(DataError, match="not allowed"):
        load_split("CIFAR10", tmp_path, train=False)
    assert not marker.exists()
    with pytest.raises(DataError, match="builtins.eval"):
        restricted_load(io.BytesIO(b"cbuiltins\neval\n(S'1+1'\ntR."), "inline")


def test_cifar_bad_batch_content(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    with open(directory / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match="test_batch"):
        load_split("CIFAR10", tmp_path, train=False)


def test_cifar_missing_names_path(tmp_path):
    with pytest.raises(DataError) as err:
        load_split("CIFAR10", tmp_path, train=True)
    message = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "download=True" in message
    with pytest.raises(DataError, match="cifar-100-python"):
        load_split("CIFAR100", tmp_path, train=False)
    with pytest.raises(DataError, match="data root"):
        load_split("CIFAR10", None, train=True)


# ---- Tiny-ImageNet -----------------------------------------------------------------------------
COLORS = {"n02000000": (200, 30, 30), "n01000000": (30, 30, 200)}  # wnids.txt is not sorted on purpose


def _jpeg(color, gray: bool = False) -> bytes:
    from PIL import Image

    img = Image.new("L", (64, 64), color[0]) if gray else Image.new("RGB", (64, 64), color)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


VAL = [("val_0.JPEG", "n02000000"), ("val_1.JPEG", "n01000000"), ("val_2.JPEG", "n01000000"),
       ("val_3.JPEG", "n02000000")]


def _write_tiny_zip(path: Path) -> None:
    top = "tiny-imagenet-200/"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(top, "")
        z.writestr(top + "wnids.txt", "".join(w + "\n" for w in COLORS))
        for wnid, color in COLORS.items():
            z.writestr(f"{top}train/{wnid}/", "")
            z.writestr(f"{top}train/{wnid}/{wnid}_boxes.txt", "")
            z.writestr(f"{top}train/{wnid}/images/", "")
            for i in range(3):
                z.writestr(f"{top}train/{wnid}/images/{wnid}_{i}.JPEG", _jpeg(color, gray=i == 2))
        z.writestr(top + "val/val_annotations.txt",
                   "".join(f"{name}\t{wnid}\t0\t0\t63\t63\n" for name, wnid in VAL))
        for name, wnid in VAL:
            z.writestr(f"{top}val/images/{name}", _jpeg(COLORS[wnid]))
        z.writestr(top + "test/images/test_0.JPEG", _jpeg((0, 0, 0)))


def _check_tiny(root: Path):
    train = load_split("TinyImageNet", root, train=True)
    assert train.images.shape == (6, 3, 64, 64) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]  # index in sorted(wnids): n01 -> 0, n02 -> 1
    assert abs(train.images[0].float().mean((1, 2)) - torch.tensor([30.0, 30, 200])).max() < 4
    assert abs(train.images[3].float().mean((1, 2)) - torch.tensor([200.0, 30, 30])).max() < 4
    gray = train.images[2].float()  # a grayscale JPEG becomes three equal channels
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    val = load_split("tiny-imagenet", root, train=False)
    assert val.images.shape == (4, 3, 64, 64)
    assert val.labels.tolist() == [1, 0, 0, 1]
    return train, val


def test_tiny_imagenet_zip_and_directory(tmp_path):
    zip_root, dir_root = tmp_path / "z", tmp_path / "d"
    zip_root.mkdir()
    dir_root.mkdir()
    _write_tiny_zip(zip_root / "tiny-imagenet-200.zip")
    with zipfile.ZipFile(zip_root / "tiny-imagenet-200.zip") as z:
        z.extractall(dir_root)
    from_zip = _check_tiny(zip_root)
    from_dir = _check_tiny(dir_root)
    for a, b in zip(from_zip, from_dir):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    # decoded splits are cached next to the data; a second load reads the cache
    for root in (zip_root, dir_root):
        assert (root / "tiny-imagenet-200.train.npz").is_file()
        assert (root / "tiny-imagenet-200.val.npz").is_file()
        assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
    shutil.rmtree(dir_root / "tiny-imagenet-200" / "train")  # served from the cache now
    cached = load_split("TinyImageNet", dir_root, train=True)
    assert torch.equal(cached.images, from_dir[0].images) and torch.equal(cached.labels, from_dir[0].labels)


def test_tiny_imagenet_missing_names_path(tmp_path):
    with pytest.raises(DataError) as err:
        load_split("TinyImageNet", tmp_path, train=True)
    assert str(tmp_path / "tiny-imagenet-200.zip") in str(err.value)


def test_tiny_imagenet_bad_annotation(tmp_path):
    _write_tiny_zip(tmp_path / "tiny-imagenet-200.zip")
    root = tmp_path / "x"
    with zipfile.ZipFile(tmp_path / "tiny-imagenet-200.zip") as z:
        z.extractall(root)
    (root / "tiny-imagenet-200" / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn09999999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="val_annotations.txt line 1"):
        load_split("TinyImageNet", root, train=False)


# ---- split_train_val ---------------------------------------------------------------------------
def _toy(n: int = 200, classes: int = 4) -> TensorData:
    labels = torch.arange(n) % classes
    labels[: n // 4] = 0  # unbalanced classes
    images = torch.arange(n, dtype=torch.int64).view(n, 1, 1, 1).expand(n, 1, 2, 2).remainder(256).to(torch.uint8)
    return TensorData(images.contiguous(), labels)


def _ids(split: TensorData) -> list[int]:
    """Recover example ids of a split of :func:`_toy` (n <= 256: the image value is the id)."""
    return split.images[:, 0, 0, 0].long().tolist()


def test_split_train_val_sizes_disjoint_deterministic():
    data = _toy()
    train, val = split_train_val(data, 0.1, seed=3)
    assert len(val) == 20 and len(train) == 180
    assert set(_ids(train)).isdisjoint(_ids(val)) and set(_ids(train)) | set(_ids(val)) == set(range(200))
    assert _ids(train) == sorted(_ids(train))  # original order kept
    again = split_train_val(data, 0.1, seed=3)[1]
    assert _ids(again) == _ids(val)
    assert _ids(split_train_val(data, 0.1, seed=4)[1]) != _ids(val)
    # stratified: per-class counts in proportion (within one example)
    full, held = data.labels.bincount(), val.labels.bincount(minlength=4)
    assert ((held.double() - full.double() * 0.1).abs() <= 1).all()


def test_split_train_val_zero_and_bad_fraction():
    data = _toy()
    train, val = split_train_val(data, 0.0, seed=0)
    assert len(train) == 200 and len(val) == 0 and val.images.shape == (0, 1, 2, 2)
    with pytest.raises(DataError):
        split_train_val(data, 1.0, seed=0)


# ---- TensorLoader ------------------------------------------------------------------------------
def test_loader_covers_each_example_once_per_epoch():
    data = _toy(103)
    loader = TensorLoader(data, 10, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 11
    for _ in range(2):
        seen = []
        for x, y in loader:
            assert x.dtype == torch.float32 and x.shape[1:] == (1, 2, 2) and len(x) == len(y) <= 10
            assert x.min() >= 0 and x.max() <= 1
            seen += (x[:, 0, 0, 0] * 255).round().long().tolist()
            assert torch.equal(y, data.labels[(x[:, 0, 0, 0] * 255).round().long()])
        assert sorted(seen) == list(range(103)) and seen != list(range(103))
    ordered = [y for _, y in TensorLoader(data, 10, shuffle=False)]
    assert torch.equal(torch.cat(ordered), data.labels)
    dropped = TensorLoader(data, 10, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    assert len(dropped) == 10 and [len(y) for _, y in dropped] == [10] * 10


def test_loader_randomness_only_from_generator():
    data = _toy(64)

    def epoch(seed):
        loader = TensorLoader(data, 16, shuffle=True, augment=True, crop_padding=1,
                              generator=torch.Generator().manual_seed(seed))
        return [(x.clone(), y.clone()) for x, y in loader]

    torch.manual_seed(0)
    first = epoch(5)
    torch.manual_seed(123)  # the global RNG must not matter
    second = epoch(5)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, epoch(6)))


# ---- random_crop_flip --------------------------------------------------------------------------
def test_crop_flip_identity_without_padding_or_flip():
    x = torch.rand(5, 3, 8, 8)
    assert torch.equal(random_crop_flip(x, 0, False, torch.Generator().manual_seed(0)), x)


def test_flip_only_equals_torch_flip():
    x = torch.rand(64, 3, 6, 7)
    out = random_crop_flip(x, 0, True, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, torch.flip(i, dims=[-1])) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 0 < sum(flipped) < len(x)


def test_crops_are_shifts_of_the_padded_image():
    pad, h, w = 3, 6, 7
    x = torch.rand(32, 2, h, w) + 1  # no zeros inside the image, so the offset is unique
    out = random_crop_flip(x, pad, False, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    offsets = []
    for b in range(len(x)):
        matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if torch.equal(out[b], padded[b, :, dy:dy + h, dx:dx + w])]
        assert len(matches) == 1
        offsets.append(matches[0])
    assert len(set(offsets)) > 1


def test_crop_flip_same_seed_same_output_and_dtypes():
    x = torch.rand(16, 3, 8, 8)
    a = random_crop_flip(x, 2, True, torch.Generator().manual_seed(7))
    b = random_crop_flip(x, 2, True, torch.Generator().manual_seed(7))
    c = random_crop_flip(x, 2, True, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape
    # laid out channels_last, so a channels_last model takes it without a copy (an NCHW .contiguous() made one)
    assert a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous()
    u = (x * 255).to(torch.uint8)
    assert torch.equal(random_crop_flip(u, 2, True, torch.Generator().manual_seed(7)),
                       (a * 255).to(torch.uint8))
