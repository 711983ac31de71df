"""The training loop: resume equivalence, fine-tuning, run-directory safety, per-epoch outputs."""

from __future__ import annotations

import json

import pytest
import torch

from ducat.checkpoint import CheckpointError, load_checkpoint
from ducat.config import load_config
from ducat.dummy import DummyClassModel
from ducat.runs import model_from_checkpoint
from ducat.train import RunError, Trainer, ducat_active, learning_rate, train

TINY = ["data.n_train=200", "data.batch_size=50", "attack.steps=2", "validation.pgd_steps=2",
        "validation.n_examples=40", "run.progress=false", "run.tensorboard=false", "run.deterministic=true",
        "run.device=cpu"]  # the bit-exact comparisons below hold on the CPU


def tiny_config(tmp_path, preset="cpu-digits-small_cnn-pgd_at-ducat", epochs=3, extra=()):
    start = min(2, epochs)
    return load_config(preset, TINY + [f"optim.epochs={epochs}", f"optim.milestones=[{start}]",
                                       f"ducat.start_epoch={start}",
                                       f"run.out={tmp_path}", *extra])


def weights(run_dir, name="last.pt"):
    return load_checkpoint(run_dir / name)["model"]


def test_schedule_and_ducat_window():
    config = load_config("paper-cifar10-resnet18-pgd_at-ducat")
    assert [learning_rate(e, config) for e in (1, 100, 101, 105, 106, 130)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert not ducat_active(104, config) and ducat_active(105, config) and ducat_active(130, config)
    plain = load_config("paper-cifar10-resnet18-pgd_at")
    assert not ducat_active(130, plain)


@pytest.mark.parametrize("method", ["pgd_at", "trades"])
def test_resume_gives_identical_weights(tmp_path, method):
    straight = tiny_config(tmp_path / "straight", f"cpu-digits-small_cnn-{method}-ducat")
    train(straight, log=lambda s: None)

    interrupted = tiny_config(tmp_path / "resumed", f"cpu-digits-small_cnn-{method}-ducat")
    trainer = Trainer(interrupted, log=lambda s: None)
    original = trainer.train_epoch

    def stop_at_epoch_2(epoch, progress=None):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(epoch, progress)

    trainer.train_epoch = stop_at_epoch_2
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    train(interrupted, resume=True, log=lambda s: None)

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_existing_run_is_never_restarted(tmp_path):
    config = tiny_config(tmp_path, epochs=1)
    train(config, log=lambda s: None)
    with pytest.raises(RunError, match="already holds a run"):
        Trainer(config)
    with pytest.raises(RunError, match="nothing to resume"):
        Trainer(tiny_config(tmp_path / "empty", epochs=1), resume=True)


def test_resume_refuses_a_changed_config(tmp_path):
    train(tiny_config(tmp_path, epochs=1), log=lambda s: None)
    changed = tiny_config(tmp_path, epochs=1, extra=["ducat.beta1=0.5"])
    with pytest.raises(RunError, match="differs"):
        Trainer(changed, resume=True)


def test_run_outputs_and_ducat_model(tmp_path):
    result = train(tiny_config(tmp_path, epochs=2), log=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["ducat_active"] for r in rows] == [False, True]
    for row in rows:
        assert 0 <= row["val_clean_acc"] <= 1 and 0 <= row["val_pgd_acc"] <= 1 and row["train_loss"] > 0
    for name in ("config.yaml", "best.pt", "last.pt", "last.pt.sha256", "model.safetensors", "summary.json"):
        assert (tmp_path / name).is_file(), name
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and torch.equal(state["model"]["dummy_index"], torch.arange(10, 20))
    model, config, _ = model_from_checkpoint(tmp_path)
    assert isinstance(model, DummyClassModel) and config.ducat.enabled
    assert result.best_epoch == 2  # DUCAT runs select among DUCAT epochs (start_epoch=2)


def test_finetune_widens_a_plain_checkpoint(tmp_path):
    base = tiny_config(tmp_path / "base", "cpu-digits-small_cnn-pgd_at", epochs=2, extra=["run.save_epochs=[1]"])
    train(base, log=lambda s: None)
    plain = weights(tmp_path / "base")
    assert load_checkpoint(tmp_path / "base" / "epoch_1.pt")["epoch"] == 1
    assert plain["net.fc.weight"].shape[0] == 10

    tuned = tiny_config(tmp_path / "tuned", epochs=3,
                        extra=[f"finetune.checkpoint={tmp_path / 'base' / 'last.pt'}", "finetune.start_epoch=3",
                               "ducat.pairing_seed=7"])
    trainer = Trainer(tuned, log=lambda s: None)
    model = trainer.model
    assert isinstance(model, DummyClassModel)
    fc = model.net.net.fc.weight
    assert torch.equal(fc[:10], plain["net.fc.weight"])
    assert torch.equal(fc[model.dummy_index], plain["net.fc.weight"])  # dummy rows start as copies
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [3] and rows[0]["ducat_active"]


def test_finetune_refuses_a_checkpoint_of_another_model(tmp_path):
    train(tiny_config(tmp_path / "base", "cpu-digits-small_cnn-pgd_at", epochs=1), log=lambda s: None)
    other = load_config("cpu-fmnist-small_cnn-pgd_at-ducat",
                        [f"finetune.checkpoint={tmp_path / 'base' / 'last.pt'}", f"run.out={tmp_path / 'x'}",
                         "model.name=resnet18"])
    with pytest.raises(CheckpointError, match="does not fit"):
        Trainer(other)


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, capsys):
    from ducat.quickstart import quickstart

    rows = quickstart(tmp_path, epochs=10, progress=False)  # the preset's schedule scaled to 10 epochs
    out = capsys.readouterr().out
    assert "| pgd_at | " in out and "| pgd_at-ducat | " in out and str(tmp_path) in out
    for name in ("pgd_at", "pgd_at-ducat"):
        assert (tmp_path / name / "summary.json").is_file()
        assert rows[name]["clean"] > 0.9  # digits is easy: a broken loop would not get here
        assert 0 < rows[name]["pgd_projected"] <= rows[name]["clean"]
    # a second call reuses the finished runs instead of training again
    quickstart(tmp_path, epochs=10, progress=False)
    assert "already finished" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["pgd_at", "mart"])
def test_a_fork_from_a_trunk_is_the_run_trained_from_scratch(tmp_path, method):
    """The spec's schedule, shared exactly: a hard-label 2C trunk to epoch t-1, forked, equals the straight run."""
    from ducat.train import fork_run, trunk_key

    preset = f"cpu-digits-small_cnn-{method}-ducat"
    straight = tiny_config(tmp_path / "straight", preset, epochs=4, extra=["ducat.start_epoch=3", "ducat.beta1=0.6"])
    train(straight, log=lambda s: None)
    trunk = tiny_config(tmp_path / "trunk", preset, epochs=4, extra=["ducat.start_epoch=4", "run.save_epochs=[2]"])
    assert trunk_key(trunk) == trunk_key(straight)
    assert train(trunk, log=lambda s: None, until_epoch=2) is None  # stopped, resumable, unfinished
    assert not (tmp_path / "trunk" / "summary.json").exists()
    forked = tiny_config(tmp_path / "forked", preset, epochs=4, extra=["ducat.start_epoch=3", "ducat.beta1=0.6"])
    fork_run(tmp_path / "trunk" / "epoch_2.pt", forked)
    train(forked, resume=True, log=lambda s: None)

    for name in ("last.pt", "best.pt"):
        a, b = weights(tmp_path / "straight", name), weights(tmp_path / "forked", name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    timing = ("epoch_time_s", "train_images_per_s")
    rows = [[{k: v for k, v in json.loads(line).items() if k not in timing} for line in
             (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("straight", "forked")]
    assert rows[0] == rows[1] and [r["epoch"] for r in rows[1]] == [1, 2, 3, 4]


def test_a_fork_is_refused_where_it_would_not_be_exact(tmp_path):
    from ducat.train import fork_run

    preset = "cpu-digits-small_cnn-pgd_at-ducat"
    trunk = tiny_config(tmp_path / "trunk", preset, epochs=4, extra=["ducat.start_epoch=4", "run.save_epochs=[2, 3]"])
    train(trunk, log=lambda s: None, until_epoch=3)
    other_lr = tiny_config(tmp_path / "a", preset, epochs=4, extra=["ducat.start_epoch=3", "optim.lr=0.01"])
    with pytest.raises(RunError, match="differ before the DUCAT start"):
        fork_run(tmp_path / "trunk" / "epoch_2.pt", other_lr)
    too_late = tiny_config(tmp_path / "b", preset, epochs=4, extra=["ducat.start_epoch=3"])
    with pytest.raises(RunError, match="not before"):
        fork_run(tmp_path / "trunk" / "epoch_3.pt", too_late)  # epoch 3 would already be DUCAT in this run
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "last.pt").exists()


@pytest.mark.parametrize("training", [True, False])
def test_validation_and_evaluation_leave_the_weights_statistics_and_modes_as_they_were(tmp_path, training):
    """Regression: validation's attack view used to switch the whole model to train mode after its first call,
    so the clean-vs-adversarial scoring ran with batch statistics and moved BatchNorm's running statistics
    (on a small_cnn: a leak of validation data into the trained model)."""
    from ducat.eval import EvalSettings, evaluate
    from ducat.train.validate import validate_model

    trainer = Trainer(tiny_config(tmp_path, epochs=1), log=lambda s: None)
    model = trainer.model.train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    validate_model(model, trainer.val_data, trainer.config)
    x, y = trainer.val_data.images[:16].float() / 255, trainer.val_data.labels[:16]
    evaluate(model, x, y, EvalSettings(eps=0.1, attacks=("pgd10", "margin"), workers=1), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training == training for m in model.modules())
