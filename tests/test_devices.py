"""The GPU and torchrun paths, checked where a CPU can show them: a meta-device model for every tensor that must
follow the model's device, gloo ranks for per-rank streams and shards, checkpoints written on another device,
deterministic pooling, and the one-line device errors. What only a GPU can show is in benchmarks/gpu_check.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ducat.attacks.fold import FoldedView
from ducat.checkpoint import load_checkpoint, save_checkpoint
from ducat.cli import main
from ducat.config import RunConfig, load_config
from ducat.distributed import DistContext
from ducat.dummy import merge_logits, project_predictions, widen_model
from ducat.models import MatrixAdaptiveAvgPool2d, build_model, deterministic_pooling
from ducat.objectives import METHODS, AttackSettings, DucatSettings
from ducat.reproduce import SCALES, plan, run_config
from ducat.reproduce.grid import flat_overrides
from ducat.runtime import configure_determinism, native_bf16
from ducat.train import train
from ducat.train.setup import use_sync_bn

DIGITS = "cpu-digits-small_cnn-pgd_at-ducat"
TINY = ["data.n_train=120", "data.batch_size=40", "attack.steps=1", "validation.pgd_steps=1",
        "validation.n_examples=20", "optim.epochs=2", "optim.milestones=[1]", "ducat.start_epoch=2",
        "run.progress=false", "run.tensorboard=false", "run.device=cpu", "run.threads=1"]
GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
BACKGROUND = {"gpu_check": lambda run, tmp: run([sys.executable, str(GPU_CHECK), "--device", "cpu", "--out", str(tmp)])}


# ---- tensors that follow the model's device ------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_a_meta_device_model_trains_every_method_with_every_tensor_on_meta(method):
    with torch.device("meta"):
        net = build_model("small_cnn", 10, 1)
    model = widen_model(net)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}  # dummy_index too
    x, y = torch.rand(4, 1, 8, 8, device="meta"), torch.randint(0, 10, (4,), device="meta")
    for mode in ("raw", "merged"):  # MART indexes dummy_index with the labels' device; merged attacks the projection
        objective = METHODS[method](AttackSettings(steps=2, mode=mode), DucatSettings())
        out = objective(model, x, y, ducat_active=True, augment=lambda t: t)
        out.loss.backward()
        assert out.loss.device.type == "meta"
    logits = model(x)
    assert merge_logits(logits, model.dummy_index).device.type == "meta"
    assert project_predictions(logits, model.dummy_index).device.type == "meta"
    assert model.dummy_index[y].device.type == "meta"  # the dummy-targeted attack's index


# ---- the grid's torchrun command line -------------------------------------------------------------------------------
def test_flat_overrides_give_back_the_same_config(tmp_path):
    """Every grid run's config survives the trip through ``ducat train PRESET section.key=value ...`` that
    ``reproduce --nproc`` makes, paths with '/' and spaces included (they used to keep their JSON quotes)."""
    root = str(tmp_path / "data dir")
    for run in plan(SCALES["smoke"]):
        config = run_config(run, tmp_path / "out", root)
        assert load_config(run.preset, flat_overrides(config)) == config, run.name


# ---- resuming a checkpoint written on another device ----------------------------------------------------------------
def _as_if_saved_on_cuda(path):
    """The checkpoint at ``path`` as a CUDA run writes it: fused SGD and a 16-byte philox generator state."""
    state = load_checkpoint(path)
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = True
    state["rng"] = {"generator": torch.arange(16, dtype=torch.uint8), "device": "cuda"}
    state.pop("format_version")
    save_checkpoint(state, path, keep_previous=False)


def test_a_checkpoint_from_a_cuda_run_resumes_on_the_cpu_with_a_warning(tmp_path):
    config = load_config(DIGITS, [*TINY, f"run.out={tmp_path / 'run'}"])
    assert train(config, until_epoch=1, log=lambda s: None) is None
    _as_if_saved_on_cuda(tmp_path / "run" / "last.pt")
    lines: list[str] = []
    result = train(config, resume=True, log=lines.append)
    assert result is not None and result.epochs == 2
    assert any("cannot continue on cpu" in line for line in lines)  # said, not hidden
    resumed = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(not group.get("fused") for group in resumed["optimizer"]["param_groups"])  # this device's kernels
    assert resumed["rng"]["device"] == "cpu" and resumed["rng"]["generator"].numel() == 5056


# ---- torchrun ranks (gloo) ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK = """
import json, sys, torch
from ducat.config import load_config
from ducat.distributed import close_process_group
from ducat.train import Trainer
torch.set_num_threads(1)
trainer = Trainer(load_config(sys.argv[1], json.loads(sys.argv[2])), log=lambda s: None)
trainer.train_epoch(1)
print(json.dumps([torch.rand(4, generator=g).tolist() for g in (trainer.stream, trainer.generator)]))
close_process_group()
"""


def test_gloo_ranks_shuffle_alike_but_draw_their_own_crops_and_starts(tmp_path):
    """Every rank must see the same global batches (one shared shuffle) and must not give its i-th example the
    same crop, flip and random start as every other rank's i-th example."""
    port, src = _free_port(), str(Path(__file__).resolve().parents[1] / "src")
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, DIGITS, json.dumps([*TINY, f"run.out={tmp_path}"])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "PYTHONPATH": src})
             for r in (0, 1)]
    outputs = [process.communicate(timeout=300) for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    (stream0, shared0), (stream1, shared1) = (json.loads(out.splitlines()[-1]) for out, _ in outputs)
    assert shared0 == shared1  # the shuffle generator: shared
    assert stream0 != stream1  # the augmentation and attack stream: each rank its own


def test_rank_streams_are_reseeded_per_epoch_and_rank():
    seeds = {DistContext(rank, 2).stream_seed(0, epoch) for rank in (0, 1) for epoch in (1, 2)}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert DistContext(1, 2).stream_seed(0, 1) == DistContext(1, 4).stream_seed(0, 1)  # a resume draws the same


def test_sync_batchnorm_is_used_for_cuda_ranks_only():
    model, two = build_model("small_cnn", 10, 1), DistContext(0, 2)
    auto, on, off = RunConfig(sync_bn="auto"), RunConfig(sync_bn="on"), RunConfig(sync_bn="off")
    assert use_sync_bn(auto, two, torch.device("cuda", 0), model)
    assert not use_sync_bn(auto, two, torch.device("cpu"), model)
    assert not use_sync_bn(auto, DistContext(), torch.device("cuda", 0), model)
    assert not use_sync_bn(off, two, torch.device("cuda", 0), model)
    assert not use_sync_bn(auto, two, torch.device("cuda", 0), build_model("mlp", 10, 1))  # no BatchNorm
    with pytest.raises(RuntimeError, match="needs CUDA"):
        use_sync_bn(on, two, torch.device("cpu"), model)


def test_sync_batchnorm_layers_are_folded_like_batchnorm():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    view = FoldedView(synced)
    x = torch.rand(3, 1, 28, 28)
    assert len(view.folded) == 4
    assert torch.allclose(view(x), synced(x), atol=1e-5)


# ---- deterministic mode ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size_in, size_out", [(28, 4), (7, 4), (8, 8), (2, 4), (32, 4)])
def test_matrix_pooling_is_adaptive_pooling_forward_and_backward(size_in, size_out):
    x = torch.rand(2, 3, size_in, size_in, requires_grad=True)
    pooled = MatrixAdaptiveAvgPool2d(size_out)(x)
    reference = nn.functional.adaptive_avg_pool2d(x, size_out)
    assert torch.allclose(pooled, reference, atol=1e-6)
    weights = torch.rand_like(reference)
    (grad,) = torch.autograd.grad((pooled * weights).sum(), x)
    (expected,) = torch.autograd.grad((reference * weights).sum(), x)
    assert torch.allclose(grad, expected, atol=1e-6)


def test_deterministic_pooling_keeps_the_state_dict():
    model = build_model("small_cnn", 10, 1)
    keys = list(model.state_dict())
    deterministic_pooling(model)
    assert list(model.state_dict()) == keys
    assert sum(isinstance(m, MatrixAdaptiveAvgPool2d) for m in model.modules()) == 1


def test_determinism_sets_cublas_workspace_and_turns_cudnn_autotuning_off(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        configure_determinism(False)
        assert torch.backends.cudnn.benchmark and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        configure_determinism(True)
        assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(was)


# ---- folding on a GPU: few kernel launches per training step ------------------------------------------------------
def test_refreshing_folded_weights_takes_one_kernel_per_convolution_and_a_few_more():
    from torch.nn.utils.fusion import fuse_conv_bn_weights
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.kernels = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.kernels += func.__name__.split(".")[0] not in ("view", "detach", "alias", "_reshape_alias")
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = build_model("resnet18", 10, 3).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.normal_()
    view = FoldedView(model)
    with Count() as count:
        view.refresh()
    assert len(view.sources) == 20 and count.kernels <= len(view.sources) + 8  # fuse_conv_bn_weights: about 15 each
    graph = view._held[1]
    for conv, bn, name in view.sources:  # the same arithmetic as torch's own fusion, bit for bit
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                            bn.weight, bn.bias)
        assert torch.equal(weight, getattr(graph, f"{name}_weight"))
        assert torch.equal(bias, getattr(graph, f"{name}_bias"))


# ---- devices, named -------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_cuda_without_a_gpu_is_one_line_naming_what_was_found(tmp_path, capsys):
    assert main(["train", DIGITS, *TINY[:-2], "run.device=cuda", f"run.out={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ducat: error: device 'cuda' requested but CUDA cannot be used: ") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_nproc_beyond_the_gpus_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["reproduce", "--scale", "smoke", "--nproc", "4", "--out", str(tmp_path / "out")]) == 2
    assert "--nproc 4 needs 4 GPUs per run; this machine has 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bf16_counts_as_native_from_compute_capability_8_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, native in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert native_bf16("cuda") is native, capability


def test_a_training_run_names_its_device_first(tmp_path):
    lines: list[str] = []
    train(load_config(DIGITS, [*TINY, "optim.epochs=1", "ducat.start_epoch=1", f"run.out={tmp_path / 'run'}"]),
          log=lines.append)
    assert lines[0].startswith("device: cpu")


def test_eval_reads_the_data_root_the_run_trained_with(tmp_path):
    """A CIFAR-10 run evaluates without giving --data-root again (it used to fail: 'CIFAR10 needs a data root')."""
    import pickle

    from ducat.eval import evaluate_checkpoint

    rng = np.random.default_rng(0)
    directory = tmp_path / "data" / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"labels": rng.integers(0, 10, 8).tolist(), b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8)}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=4))
    config = load_config("cpu-digits-small_cnn-pgd_at", [*TINY, "optim.epochs=1", "data.dataset=CIFAR10",
                                                          "data.n_train=40", "data.val_fraction=0.25",
                                                          f"data.root={tmp_path / 'data'}", "data.flip=true",
                                                          f"run.out={tmp_path / 'run'}"])
    train(config, log=lambda s: None)
    report = evaluate_checkpoint(tmp_path / "run", progress=False, device="cpu",
                                 settings={"n_examples": 4, "attacks": ("pgd10",), "workers": 1})
    assert report.n_examples == 4


@pytest.mark.slow
def test_the_gpu_check_passes_at_toy_size_on_the_cpu(background):
    """``benchmarks/gpu_check.py --device cpu`` runs every check of the GPU machine check, so it cannot rot (run
    in conftest's background lane)."""
    done = background.result("gpu_check")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    verdicts = [line.split(" ", 1)[0] for line in done.stdout.splitlines() if line.split(" ", 1)[0] in
                ("PASS", "FAIL", "SKIP")]
    assert len(verdicts) == 7 and "FAIL" not in verdicts and verdicts.count("SKIP") <= 1  # bf16 where emulated
    assert "| 16 | on | fp32 |" in done.stdout and "gpu_check: " in done.stdout.splitlines()[-1]
