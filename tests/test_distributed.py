"""torchrun with 2 CPU processes (gloo) gives the one-process result for the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ducat.checkpoint import load_checkpoint
from ducat.distributed import DistContext

# No per-example randomness (no augmentation, no random start) and no BatchNorm (the MLP), so a
# 2-rank step must equal the 1-process step on the same global batch up to summation order.
ARGS = ["cpu-digits-small_cnn-pgd_at-ducat", "model.name=mlp", "data.n_train=256", "data.val_fraction=0.25",
        "data.batch_size=64", "data.augment=false", "attack.random_start=false", "attack.steps=3",
        "optim.epochs=2", "optim.milestones=[1]", "ducat.start_epoch=2", "validation.pgd_steps=2",
        "run.progress=false", "run.tensorboard=false", "run.deterministic=true", "run.threads=1", "run.device=cpu",
        "run.amp=off"]  # fp32: the equivalence is up to summation order, which bf16 rounding would swamp


def test_shards_cover_the_batch_once():
    for n in (1, 7, 64):
        rows = []
        for rank in range(3):
            s = DistContext(rank, 3).shard(n)
            rows.extend(range(n)[s])
        assert rows == list(range(n))


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path):
    one = subprocess.run([sys.executable, "-m", "ducat", "train", *ARGS, f"run.out={tmp_path / 'one'}"],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ducat", "train", *ARGS, f"run.out={tmp_path / 'two'}"],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]

    a, b = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), rtol=1e-4, atol=1e-6), key
    rows_one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    rows_two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_clean_acc"] for r in rows_one] == [r["val_clean_acc"] for r in rows_two]
    assert rows_one[-1]["train_loss"] == pytest.approx(rows_two[-1]["train_loss"], rel=1e-4)
    # each rank trained on its half of every global batch, not on the whole batch
    assert [(r["world_size"], r["rank0_images"]) for r in rows_two] == [(2, 96), (2, 96)]
    assert [(r["world_size"], r["rank0_images"]) for r in rows_one] == [(1, 192), (1, 192)]


@pytest.mark.slow
def test_torchrun_skips_a_batch_smaller_than_the_world_and_rank_0_alone_speaks(tmp_path):
    """172 images, a quarter held out: 129 train in batches of 64, so the last global batch holds one image and
    one of two ranks would get none (its loss was NaN and the run stopped). A resume is announced, and the run's
    end reported, once: by rank 0, the only rank that writes."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ducat",
                "train"]
    args = [*ARGS, "data.n_train=172", f"run.out={tmp_path / 'run'}"]
    first = subprocess.run([*torchrun, *args, "--until-epoch", "1"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = subprocess.run([*torchrun, "--resume", str(tmp_path / "run")], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.count("resuming") == 1 and resumed.stdout.count("run written to") == 1, resumed.stdout
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["train_loss"] == r["train_loss"] for r in rows)
    assert [r["rank0_images"] for r in rows] == [64, 64]  # two batches of 32 each; the one-image batch skipped
