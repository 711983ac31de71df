"""The evaluation cache never returns another evaluation's results, survives damaged files and concurrent writers.

Probe findings (main at 048b4d6): the cache key covered the weights and the settings but not the inputs, the
labels or the code, so evaluating set B after set A with the same ``cache_dir`` returned A's per-example results
(random noise scored 0.775 instead of 0.025); an emptied ``.npz`` gave an ``EOFError`` traceback on every rerun;
two writers of one key collided on a fixed temporary name (``FileNotFoundError``, ``EOFError``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ducat.eval import EvalSettings, evaluate

SRC = Path(__file__).resolve().parents[1] / "src"
ATTACKS = ("pgd10", "margin")


@pytest.fixture(scope="module")
def digits_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small classifier trained on sklearn digits (clean test accuracy about 0.9), and 80 test images."""
    from ducat.data import load_split

    torch.manual_seed(0)
    train = load_split("digits", None, train=True)
    x, y = train.images[:512].float() / 255, train.labels[:512]
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    test = load_split("digits", None, train=False)
    return model.eval(), test.images[:80].float() / 255, test.labels[:80]


def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cache_dir: Path | None):
    return evaluate(model, x, y, EvalSettings(eps=0.05, attacks=ATTACKS), cache_dir=cache_dir, progress=False)


def same_results(a, b) -> bool:
    """Same per-example results (every mask) and the same accuracies; timings aside."""
    return (a.masks.keys() == b.masks.keys() and all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
            and a.results == b.results and a.worst_case == b.worst_case)


def test_a_second_set_of_the_same_size_is_never_served_the_first_sets_results(digits_model, tmp_path):
    model, x, y = digits_model
    set_a, set_b = (x[:40], y[:40]), (x[40:], y[40:])
    relabelled = (x[:40], (y[:40] + 1) % 10)  # the same images with other labels
    noise = (torch.rand(40, *x.shape[1:], generator=torch.Generator().manual_seed(1)),
             torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(2)))
    first = run(model, *set_a, tmp_path)
    assert first.worst_case["robust_accuracy"] > 0.5  # robust on most of set A (0.775)
    for name, data in (("set B", set_b), ("relabelled A", relabelled), ("noise", noise)):
        cached, fresh = run(model, *data, tmp_path), run(model, *data, None)
        assert same_results(cached, fresh), name
    assert run(model, *noise, None).worst_case["robust_accuracy"] < 0.2  # noise: about 0, not set A's 0.775
    assert same_results(run(model, *set_a, tmp_path), first)  # set A itself is still served from the cache


def test_the_cache_key_covers_the_code_version(digits_model, tmp_path, monkeypatch):
    import ducat.eval.runner as runner

    model, x, y = digits_model
    run(model, x[:20], y[:20], tmp_path)
    files = sorted(tmp_path.rglob("*.npz"))  # the checks' results (in checks/) too
    run(model, x[:20], y[:20], tmp_path)
    assert sorted(tmp_path.rglob("*.npz")) == files  # same code: every attack served from the cache
    monkeypatch.setattr(runner, "code_version", lambda: "other code")
    run(model, x[:20], y[:20], tmp_path)
    assert len(list(tmp_path.rglob("*.npz"))) == 2 * len(files)  # other code: every attack recomputed


@pytest.mark.parametrize("damage", ["emptied", "truncated", "header-only", "not-a-zip"])
def test_a_damaged_cache_file_is_recomputed_not_a_traceback(digits_model, tmp_path, damage):
    model, x, y = digits_model
    straight = run(model, x[:30], y[:30], tmp_path)
    files = sorted(tmp_path.glob("*.npz"))
    assert len(files) == 2
    for path in files:
        data = path.read_bytes()
        path.write_bytes({"emptied": b"", "truncated": data[: len(data) // 2], "header-only": data[:30],
                          "not-a-zip": b"not a zip file at all"}[damage])
    again = run(model, x[:30], y[:30], tmp_path)
    assert same_results(again, straight)
    for path in files:  # rewritten whole by the rerun
        with np.load(path) as data:
            assert data["robust"].shape == (30,)


def test_every_truncation_and_bit_flip_of_a_cache_file_is_a_miss_or_the_same_result(tmp_path):
    """Found by this test: some flipped bytes made ``zipfile`` raise ``NotImplementedError`` (compression
    method, version) or ``RuntimeError`` (encryption flag) out of ``ResultCache.get``."""
    from ducat.eval.runner import AttackResult, ResultCache

    n = 8
    rng = np.random.default_rng(0)
    result = AttackResult(rng.random(n) < 0.5, rng.integers(0, 10, n), rng.integers(0, 10, n), np.ones(n, bool))
    cache = ResultCache(tmp_path, "a" * 64, n)
    cache.put("paper-pgd10", result)
    path = next(tmp_path.glob("*.npz"))
    good, on = path.read_bytes(), np.ones(n, bool)
    damaged = [good[:k] for k in range(len(good))]
    damaged += [good[:i] + bytes([good[i] ^ 0xFF]) + good[i + 1:] for i in range(len(good))]
    served = 0
    for data in damaged:
        path.write_bytes(data)
        got = cache.get("paper-pgd10", on)  # must not raise
        if got is not None:
            served += 1
            assert all(np.array_equal(getattr(got, f), getattr(result, f)) for f in ResultCache.FIELDS)
    assert served < len(damaged) // 2  # most damage is detected (zip CRC, sizes), the rest is harmless metadata


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    from ducat.eval.runner import AttackResult, ResultCache
    directory, writer, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    cache = ResultCache(directory, "f" * 64, 64)
    for index in range(count):
        robust = (np.arange(64) + writer + index) % 3 == 0
        tag = np.full(64, writer * 100000 + index)
        cache.put("paper-pgd10", AttackResult(robust, tag, tag, np.ones(64, bool)))
""")


def writers_and_a_reader(directory: Path, writes: int) -> tuple[int, list[str]]:
    """Two processes put the same key ``writes`` times each while this one reads it in a loop."""
    from ducat.eval.runner import AttackResult, ResultCache

    cache, on = ResultCache(directory, "f" * 64, 64), np.ones(64, bool)
    cache.put("paper-pgd10", AttackResult(np.arange(64) % 3 == 0, np.zeros(64, int), np.zeros(64, int), on.copy()))
    env = {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(directory), str(w), str(writes)], env=env,
                                stderr=subprocess.PIPE, text=True) for w in (1, 2)]
    reads, problems = 0, []
    while any(w.poll() is None for w in writers):
        got = cache.get("paper-pgd10", on)
        reads += 1
        if got is None:
            problems.append(f"read {reads}: a miss (the file was missing or unreadable)")
            continue
        writer, index = divmod(int(got.raw[0]), 100000)
        expected = (np.arange(64) + writer + index) % 3 == 0
        if not (np.array_equal(got.robust, expected) and (got.raw == got.raw[0]).all()):
            problems.append(f"read {reads}: not one complete version")
    for w in writers:
        if w.wait() != 0:
            problems.append(f"writer exited {w.returncode}: {w.stderr.read().strip().splitlines()[-1:]}")
    return reads, problems


@pytest.mark.slow
def test_two_processes_writing_one_cache_key_1500_times_each_while_a_third_reads(tmp_path):
    """The probe's figures: about 30 FileNotFoundError and some EOFError on main at 048b4d6."""
    reads, problems = writers_and_a_reader(tmp_path, writes=1500)
    assert not problems, (len(problems), problems[:5])
    assert reads > 100
