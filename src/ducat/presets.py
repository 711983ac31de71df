"""The shipped presets as a table (``ducat presets``), with what a run of each costs, estimated.

A preset's cost is hidden in its recipe: the Fashion-MNIST presets take over an hour on 2 CPU cores,
the digits presets under a minute. The table shows, per preset, its dataset, model, method, epochs
and an estimated training time on two devices.

The estimate is a cost model, not a measurement. Work is counted in FLOPs from
:func:`ducat.models.count_flops` (``F``: one forward pass of one image through the run's model, 2C
head included) and in passes (one forward or one backward of one batch):

- a PGD-K training image costs ``2K F`` for the attack (forward and input-gradient backward per step)
  plus ``3F`` for the training step when only ``x'`` is forwarded (PGD-AT, Consistency-AT without
  DUCAT) or ``6F`` when ``[x; x']`` is (DUCAT epochs, TRADES, MART): ``(2K + 6) F`` for PGD-10 +
  DUCAT. TRADES adds ``1F`` (its attack's clean target). Consistency-AT does all of it on two views.
  A batch costs ``2K + 2`` passes (``2K + 3`` for TRADES), whatever its size;
- per-epoch validation: ``validation.n_examples`` examples at ``(2V + 2) F`` each (clean forward, PGD-V,
  final forward), ``2V + 2`` passes per validation batch; twice when the test split selects.

Seconds = FLOPs / (the device's FLOP/s) + passes x (its seconds per pass). The second term is the
fixed cost of a pass (kernel launches, small-tensor work); it dominates for tiny models such as the
digits CNN. Data loading, augmentation and checkpoints are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from ducat.config import TrainConfig, base_presets, load_config, preset_names
from ducat.data import dataset_info
from ducat.dummy import widen_model
from ducat.models import build_model, count_flops
from ducat.objectives import METHODS


@dataclass(frozen=True)
class Throughput:
    """A device as the cost model sees it: useful FLOP/s over a whole training step, the fixed seconds of one
    pass (one forward or one backward of one batch), and where these figures come from."""

    label: str
    flop_per_s: float
    s_per_pass: float
    source: str

    def describe(self) -> str:
        tera = self.flop_per_s >= 1e12
        rate = f"{self.flop_per_s / 1e12:g} TFLOP/s" if tera else f"{self.flop_per_s / 1e9:.0f} GFLOP/s"
        return f"{self.label}: {rate} and {1e3 * self.s_per_pass:.2g} ms per pass, {self.source}"


# The two unknowns solved from two measured training epochs of this project's machine, at opposite ends of the
# model size; the epochs, and the check against epochs they were not fitted to: docs/performance.md, "Cost model".
CPU_2_CORES = Throughput("CPU, 2 cores", 117e9, 1.7e-3,
                         "calibrated on measured small-CNN epochs on this project's idle 2-core AMD EPYC (fp32, "
                         "2 threads); for larger models an extrapolation")
# Assumed, not measured: an A100-class GPU in bf16 autocast sustaining a third of its dense bf16 peak, and 0.5 ms
# per pass (docs/performance.md, "GPU projection"; benchmarks/gpu_check.py prints a measurement beside it).
ONE_GPU = Throughput("1 GPU", 100e12, 5e-4, "assumed for one A100-class GPU in bf16 (not measured)")


@dataclass(frozen=True)
class Work:
    """What a run computes: ``flops`` (FLOPs) and ``passes`` (forward or backward passes of one batch)."""

    flops: float
    passes: float

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.passes + other.passes)

    def seconds(self, device: Throughput) -> float:
        return self.flops / device.flop_per_s + self.passes * device.s_per_pass


@lru_cache(maxsize=None)
def _forward_flops(model: str, dataset: str) -> tuple[int, int]:
    """``F`` of the C-output model and of its 2C-output widening (one model built, widened in place)."""
    info = dataset_info(dataset)
    shape = (info.in_channels, info.image_size, info.image_size)
    net = build_model(model, info.num_classes, info.in_channels)
    plain = count_flops(net, shape)
    return plain, count_flops(widen_model(net, dummy_init="zero"), shape)


# ``_forward_flops`` of the (model, dataset) pairs of the shipped presets, so that listing them builds no model
# (a WRN-28-10 takes a second to build and count on a CPU); tests/test_ux.py recounts every entry.
COUNTED_FLOPS: dict[tuple[str, str], tuple[int, int]] = {
    ("small_cnn", "digits"): (1290240, 1300480),
    ("small_cnn", "FashionMNIST"): (9792000, 9802240),
    ("resnet18", "CIFAR10"): (1110845440, 1110855680),
    ("resnet18", "CIFAR100"): (1110937600, 1111040000),
    ("resnet18", "TinyImageNet"): (4443545600, 4443750400),
    ("wrn28_10", "CIFAR10"): (10486657536, 10486670336),
    ("wrn28_10", "CIFAR100"): (10486772736, 10486900736),
    ("wrn28_10", "TinyImageNet"): (41946834944, 41947090944),
}


def forward_flops(config: TrainConfig) -> int:
    """``F``: FLOPs of one forward pass of one image through the run's model (2C head when DUCAT is on)."""
    key = (config.model.name, config.data.dataset)
    counted = COUNTED_FLOPS.get(key) or _forward_flops(*key)
    return counted[config.ducat.enabled]


def step_cost(method: str, steps: int, ducat_active: bool) -> tuple[int, int]:
    """(forward-equivalents ``F`` per training image, passes per batch) of one training step of ``method``, as the
    method declares it (:meth:`ducat.objectives.Objective.step_cost`)."""
    return METHODS[method].step_cost(steps, ducat_active)


def training_work(config: TrainConfig, first: int = 1, last: int | None = None) -> Work:
    """What training ``config`` computes over its epochs ``first`` to ``last`` (default: all), validation
    included: a whole run, or the part of it that a reproduction's trunk or fork trains."""
    d, o, v = config.data, config.optim, config.validation
    last = o.epochs if last is None else last
    flops = forward_flops(config)
    n_total = dataset_info(d.dataset).train_size
    n_total = n_total if d.n_train is None else min(d.n_train, n_total)
    n_val = round(n_total * d.val_fraction)
    n_train = n_total - n_val
    batches = math.ceil(n_train / d.batch_size)
    epochs = max(0, last - first + 1)
    start = config.ducat.start_epoch if config.ducat.enabled else last + 1
    active = max(0, last - max(first, start) + 1)
    work = Work(0.0, 0.0)
    for is_active, count in ((False, epochs - active), (True, active)):
        units, passes = step_cost(config.method.name, config.attack.steps, is_active)
        work = work + Work(count * n_train * units * flops, count * batches * passes)
    n_eval = n_val if v.n_examples is None else min(v.n_examples, n_val or v.n_examples)
    splits = 2 if v.select == "test" and n_val else 1
    per_epoch = Work(n_eval * (2 * v.pgd_steps + 2) * flops,
                     math.ceil(n_eval / v.batch_size) * (2 * v.pgd_steps + 2))
    return work + Work(epochs * splits * per_epoch.flops, epochs * splits * per_epoch.passes)


def estimate_seconds(config: TrainConfig, device: Throughput) -> float:
    """Estimated wall time in seconds of training ``config`` on ``device`` (module docstring: the model)."""
    return training_work(config).seconds(device)


@dataclass(frozen=True)
class PresetRow:
    name: str
    dataset: str
    model: str
    method: str
    epochs: int
    is_base: bool
    cpu_s: float
    gpu_s: float


def method_label(config: TrainConfig, is_base: bool) -> str:
    """``pgd_at``, ``pgd_at+DUCAT``, ``pgd_at+DUCAT-toy`` (hard labels, beta1 = beta2 = 1), or ``(base)``."""
    if is_base:
        return "(base)"
    u = config.ducat
    toy = "-toy" if u.enabled and u.beta1 == 1.0 and u.beta2 == 1.0 else ""
    return config.method.name + ("+DUCAT" if u.enabled else "") + toy


def preset_rows(include_base: bool = False) -> list[PresetRow]:
    """One row per shipped preset; base presets (only inherited from) only with ``include_base``."""
    bases = base_presets()
    rows = []
    for name in preset_names():
        if name in bases and not include_base:
            continue
        config = load_config(name, ["run.out=."])
        rows.append(PresetRow(name, config.data.dataset, config.model.name, method_label(config, name in bases),
                              config.optim.epochs, name in bases, estimate_seconds(config, CPU_2_CORES),
                              estimate_seconds(config, ONE_GPU)))
    return rows


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.4 h``, ``2.1 d``, ``6.6 y``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds < 365 * 86400:
        return f"{seconds / 86400:.1f} d"
    return f"{seconds / (365 * 86400):.1f} y"


def presets_table(include_base: bool = False) -> str:
    """``ducat presets``: what the estimates assume, then one aligned row per preset."""
    rows = preset_rows(include_base)
    header = ("preset", "dataset", "model", "method", "epochs", "est. CPU", "est. GPU")
    cells = [header] + [(r.name, r.dataset, r.model, r.method, str(r.epochs), format_duration(r.cpu_s),
                         format_duration(r.gpu_s)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    right = {4, 5, 6}
    lines = [
        "Estimated training time of each preset: a cost model (FLOPs and passes, see ducat.presets), not a "
        "measurement.",
        f"  est. CPU = {CPU_2_CORES.describe()}",
        f"  est. GPU = {ONE_GPU.describe()}",
        "Other jobs on the same cores make a run several times longer. Base presets (recipes the others inherit "
        "with base:) are " +
        ("marked (base)." if include_base else "hidden; --all shows them."),
        ""]
    for row in cells:
        lines.append("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines)
