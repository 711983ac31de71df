"""``ducat reproduce --launcher``: the grid's runs as jobs on a Dask cluster (src/ducat/reproduce/launch.py,
engine.py, jobs.py).

Without the cluster extra (``pip install -e ".[cluster]"``) the tests that need Dask are skipped; CI installs
it. The slow tests share one module fixture, three real ``ducat reproduce`` invocations at the smoke scale
(one seed), run in conftest's background lane: the sequential path (``smoke_grid``, shared with
tests/test_reproduce.py), then the local launcher with 2 jobs at a time during which one job is SIGKILLed
midway (the crash hook of ``ducat.fileio``: the trunk ``trunk-pgd_at-s0``, the only job that writes
``epoch_1.pt``, kills itself while writing it, after its epoch-1 ``last.pt``), then the same command again,
which resumes it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ducat.checkpoint import load_checkpoint
from ducat.cli import main
from ducat.reproduce.engine import Job, JobFailed, job_environment, run_jobs
from ducat.reproduce.launch import Launcher, local_cluster, slurm_cluster, slurm_launcher

SRC = Path(__file__).resolve().parents[1] / "src"
HAS_DASK = importlib.util.find_spec("distributed") is not None
HAS_JOBQUEUE = HAS_DASK and importlib.util.find_spec("dask_jobqueue") is not None
INSTALL = 'pip install -e ".[cluster]"'
needs_dask = pytest.mark.skipif(not HAS_DASK, reason=f"Dask is not installed: {INSTALL}")
needs_jobqueue = pytest.mark.skipif(not HAS_JOBQUEUE, reason=f"dask-jobqueue is not installed: {INSTALL}")
GRID = ["reproduce", "--scale", "smoke", "--seeds", "1", "--threads", "1", "--workers", "1"]  # as conftest's smoke_grid
LAUNCHED = [*GRID, "--launcher", "local", "--jobs", "2"]
KILLED = "trunk-pgd_at-s0"
NEEDS_KILLED = ("pgd_at-ducat-s0", "pgd_at-toy-s0", "ablation-start_epoch-2", "ablation-beta1-1")


def fake_sbatch(directory: Path) -> Path:
    """An ``sbatch`` on a PATH of its own that fails: only its presence is checked before submitting."""
    directory.mkdir(exist_ok=True)
    (directory / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (directory / "sbatch").chmod(0o755)
    return directory


@pytest.mark.parametrize("args, needle", [
    (["--launcher", "nope"], "argument --launcher: invalid choice: 'nope'"),
    (["--jobs", "2"], "--jobs needs --launcher"),
    (["--partition", "gpu"], "--partition needs --launcher slurm"),
    (["--cluster-config", "c.yaml"], "--cluster-config needs --launcher slurm"),
    (["--launcher", "local", "--time-limit", "1:00:00"], "--time-limit is an option of --launcher slurm"),
    (["--launcher", "local", "--nproc", "2"], "--nproc trains one run on several GPUs"),
    (["--launcher", "local", "--jobs", "0"], "--jobs must be >= 1, got 0"),
    (["--launcher", "local", "NO-ENGINE"], 'needs distributed (Dask), which is not installed; install it with: '
                                          'pip install -e ".[cluster]"'),
    (["--launcher", "slurm", "--time-limit", "1:00:00", "NO-SBATCH"], "'sbatch' is not on the PATH"),
    (["--launcher", "slurm", "SBATCH"], "--launcher slurm needs a time limit per job"),
    (["--launcher", "slurm", "--time-limit", "soon", "SBATCH"], "'soon' is not a SLURM time"),
    (["--launcher", "slurm", "--cluster-config", "bad.yaml", "SBATCH"], "unknown setting 'gpu'; choose from"),
    (["--launcher", "slurm", "--cluster-config", "missing.yaml", "SBATCH"], "cannot read it"),
])
def test_launcher_bad_input_is_one_line_and_exit_2_before_anything_runs(args, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("partition: gpu\ngpu: 2\n")
    if "NO-ENGINE" in args:
        monkeypatch.setitem(sys.modules, "distributed", None)  # as if it were not installed
    elif "slurm" in args and not HAS_JOBQUEUE:
        pytest.skip(f"dask-jobqueue is not installed: {INSTALL}")
    if "SBATCH" in args:
        monkeypatch.setenv("PATH", str(fake_sbatch(tmp_path / "bin")))
    if "NO-SBATCH" in args:
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    args = [a for a in args if a not in ("NO-ENGINE", "SBATCH", "NO-SBATCH")]
    assert main([*GRID, "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ducat: error: ") and err.count("\n") == 1, err
    assert needle in err
    assert not (tmp_path / "out").exists()  # nothing submitted, nothing written


@needs_jobqueue
def test_slurm_settings_from_a_yaml_file_and_flags_make_the_job_script(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{fake_sbatch(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}")
    config = tmp_path / "cluster.yaml"
    config.write_text(textwrap.dedent("""\
        partition: long
        time_limit: "12:00:00"
        gpus_per_job: 2
        cores_per_job: 16
        memory: 64GB
        account: proj42
        interface: lo
        jobs: 5
        directives: ["--constraint=a100"]
        setup: ["source ~/venv/bin/activate"]
    """))
    launcher = slurm_launcher(Launcher("slurm"), config, {"partition": "gpu", "time_limit": None, "jobs": 3})
    assert (launcher.partition, launcher.time_limit, launcher.gpus_per_job, launcher.jobs) == ("gpu", "12:00:00", 2, 3)
    with slurm_cluster(launcher, tmp_path / "logs", count=0) as cluster:
        script = cluster.job_script()
    for line in ("#SBATCH -p gpu", "#SBATCH -A proj42", "#SBATCH -t 12:00:00", "#SBATCH --cpus-per-task=16",
                 "#SBATCH --gres=gpu:2", "#SBATCH --constraint=a100", "source ~/venv/bin/activate",
                 "--nthreads 1", "--interface lo", f"{tmp_path / 'logs'}/"):
        assert line in script, (line, script)


def slurm_on_this_machine(directory: Path) -> Path:
    """``sbatch`` and ``scancel`` that run a job script here, in a session of its own, and stop it: SLURM's
    part of the slurm launcher, without SLURM. Each job's ID (its process group) is recorded in ``submitted``."""
    directory.mkdir(exist_ok=True)
    (directory / "sbatch").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        cp "$1" {directory}/job-$$.sh
        setsid sh {directory}/job-$$.sh > {directory}/job-$$.out 2>&1 < /dev/null &
        echo $! >> {directory}/submitted
        echo "Submitted batch job $!"
    """))
    (directory / "scancel").write_text("#!/bin/sh\nfor id in \"$@\"; do kill -TERM -- -$id 2>/dev/null; done\nexit 0\n")
    for name in ("sbatch", "scancel"):
        (directory / name).chmod(0o755)
    return directory


@pytest.mark.slow
@needs_jobqueue
def test_the_slurm_launcher_runs_jobs_in_the_jobs_it_submits_and_replaces_one_that_ends(tmp_path, monkeypatch):
    import dask

    slurm = slurm_on_this_machine(tmp_path / "slurm")
    monkeypatch.setenv("PATH", f"{slurm}{os.pathsep}{os.environ['PATH']}")
    config = tmp_path / "cluster.yaml"
    config.write_text("gpus_per_job: 0\ncores_per_job: 1\nmemory: 1GB\ninterface: lo\n")
    launcher = slurm_launcher(Launcher("slurm"), config, {"time_limit": "10", "jobs": 2})
    record = f"import os; open({str(tmp_path / 'groups')!r}, 'a').write(f'{{os.getpgrp()}}\\n')"
    jobs = [_job(tmp_path, "first", record), _job(tmp_path, "second", record),
            _job(tmp_path, "after-first", record, needs=("first",))]
    lost = {"distributed.deploy.lost-worker-timeout": "1s"}  # replace a lost job after 1 s, not 15
    with dask.config.set(lost), slurm_cluster(launcher, tmp_path / "logs", count=2) as cluster, \
            __import__("distributed").Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        outcome = run_jobs(client, jobs, lambda line: None, poll=0.1)
        assert sorted(outcome.finished) == ["after-first", "first", "second"] and not outcome.failed
        submitted = (slurm / "submitted").read_text().split()
        assert len(submitted) == 2
        assert all("#SBATCH -t 10" in script.read_text() for script in slurm.glob("job-*.sh"))
        groups = (tmp_path / "groups").read_text().split()
        assert len(groups) == 3 and set(groups) <= set(submitted)  # each job ran inside a "SLURM job"
        os.kill(-int(next(iter(client.run(os.getpgrp).values()))), signal.SIGTERM)  # one "SLURM job" ends
        deadline = time.monotonic() + 60
        while len((slurm / "submitted").read_text().split()) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len((slurm / "submitted").read_text().split()) == 3  # and another one is submitted
        client.wait_for_workers(2, timeout=60)  # which joins (then the cluster cancels both with scancel)
    for group in (slurm / "submitted").read_text().split():
        assert _wait_gone(int(group)), f"'SLURM job' {group} still runs"


def _job(tmp_path: Path, name: str, code: str, needs: tuple[str, ...] = ()) -> Job:
    """A job that records its start and end times in ``times.jsonl``, runs ``code``, and sleeps 1 s."""
    body = (f"import json, time\nstart = time.time()\n{code}\ntime.sleep(1)\n"
            f"open({str(tmp_path / 'times.jsonl')!r}, 'a').write(json.dumps([{name!r}, start, time.time()]) + '\\n')")
    return Job(name, (sys.executable, "-c", body), tmp_path / "logs" / f"{name}.log", needs=needs)


@needs_dask
def test_a_job_does_not_inherit_the_dask_nannys_malloc_setting_but_keeps_the_users_and_its_own(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # as the nanny leaves it in its worker's environment
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a user's value, not the nanny's 1
    env = job_environment(Job("j", ("true",), Path("j.log"), env={"CUDA_VISIBLE_DEVICES": "1"}))
    assert "MALLOC_TRIM_THRESHOLD_" not in env
    assert env["OMP_NUM_THREADS"] == "3" and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["PATH"] == os.environ["PATH"] and env["DUCAT_JOB_PARENT"] == str(os.getpid())


@needs_dask
def test_engine_runs_two_at_a_time_reports_a_failed_job_and_skips_what_needs_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    ready = tmp_path / "first.done"
    gpu = f"open({str(tmp_path / 'gpus')!r}, 'a').write(__import__('os').environ['CUDA_VISIBLE_DEVICES'] + ' ')"
    trim = "repr(__import__('os').environ.get('MALLOC_TRIM_THRESHOLD_'))"
    malloc = f"open({str(tmp_path / 'malloc')!r}, 'w').write({trim})"
    jobs = [_job(tmp_path, "first", f"open({str(ready)!r}, 'w'); {gpu}"),  # the first two start at once
            _job(tmp_path, "third", f"{gpu}; {malloc}"),
            _job(tmp_path, "broken", "print('about to fail'); raise SystemExit(3)"),
            _job(tmp_path, "second", f"assert __import__('os').path.exists({str(ready)!r})", needs=("first",)),
            _job(tmp_path, "after-broken", "pass", needs=("broken",))]
    lines: list[str] = []
    slots = [{"CUDA_VISIBLE_DEVICES": "3"}, {"CUDA_VISIBLE_DEVICES": "5"}]  # as local_slots makes them for GPUs
    with local_cluster(slots) as cluster, __import__("distributed").Client(cluster) as client:
        outcome = run_jobs(client, jobs, lines.append, poll=0.1)

    assert sorted(outcome.finished) == ["first", "second", "third"]
    assert outcome.not_run == {"after-broken": "broken"}
    failure = outcome.failed["broken"]
    assert isinstance(failure, JobFailed) and failure.reason == "exited with code 3"
    log = Path(failure.log).read_text()
    assert failure.log == str(tmp_path / "logs" / "broken.log") and "about to fail" in log
    assert "==== broken: exited with code 3" in log
    assert not (tmp_path / "logs" / "after-broken.log").exists()  # it never started

    records = [json.loads(line) for line in (tmp_path / "times.jsonl").read_text().splitlines()]
    times = {name: (start, end) for name, start, end in records}
    assert times["second"][0] >= times["first"][1]  # a job starts after the job it needs
    moments = sorted(t for span in times.values() for t in span)
    running = [sum(s <= t < e for s, e in times.values()) for t in moments]
    assert max(running) == 2  # two jobs at a time, never three
    assert sorted((tmp_path / "gpus").read_text().split()) == ["3", "5"]  # the two at once: one "GPU" each
    assert (tmp_path / "malloc").read_text() == "None"  # the nanny's MALLOC_TRIM_THRESHOLD_ stayed with it

    events = [line.split(" ", 1)[1].split(" |")[0] for line in lines]
    for name in ("first", "third", "broken", "second"):  # every start is printed once, before its end
        end = next(i for i, e in enumerate(events) if e == f"finished {name}" or e.startswith(f"FAILED {name} "))
        assert events.count(f"started {name}") == 1 and events.index(f"started {name}") < end, events
    assert not any("started after-broken" in line for line in lines)
    assert any("FAILED broken exited with code 3; log: " in line for line in lines), lines
    assert any("not run after-broken (needs broken)" in line for line in lines), lines
    assert any("slowest running: " in line for line in lines), lines
    assert lines[-1].endswith("jobs: 3 finished, 0 running, 0 queued, 1 failed, 1 not run"), lines[-1]


@pytest.mark.parametrize("visible, jobs, threads, want_gpus, want_threads", [
    (None, None, None, ["0", "1", "2", "3", "4", "5", "6", "7"], 2),  # one job per GPU, 16 cores shared
    ("2,5", None, None, ["2", "5"], 8),                               # the GPUs this process may use
    ("2,5", 3, 1, ["2", "5", "2"], 1),                                # more jobs than GPUs: round robin
])
def test_local_slots_give_each_worker_one_gpu(visible, jobs, threads, want_gpus, want_threads, monkeypatch):
    import torch

    from ducat.reproduce import launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(visible.split(",")) if visible else 8)
    monkeypatch.setattr("ducat.runtime.usable_cores", lambda: 16)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    slots, per_job = launch.local_slots(Launcher("local", jobs=jobs, threads=threads), "auto")
    assert [slot["CUDA_VISIBLE_DEVICES"] for slot in slots] == want_gpus and per_job == want_threads
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU: one single-threaded job per core
    assert launch.local_slots(Launcher("local"), "auto") == ([{}] * 16, 1)


def test_a_job_dies_with_the_process_that_started_it(tmp_path):
    """A stopped launcher leaves no job behind holding its run's lock (job._end_with_parent)."""
    job = ("import os, sys, time; sys.path.insert(0, os.environ['SRC']); from ducat.reproduce.job import "
           "_end_with_parent; _end_with_parent(); print('ready', flush=True); time.sleep(120)")
    parent = ("import os, subprocess, sys, time; env = dict(os.environ, DUCAT_JOB_PARENT=str(os.getpid())); "
              f"child = subprocess.Popen([sys.executable, '-c', {job!r}], env=env, stdout=subprocess.PIPE, text=True); "
              "child.stdout.readline(); print(child.pid, flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", parent], env={**os.environ, "SRC": str(SRC)}, stdout=subprocess.PIPE,
                            text=True)
    child = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _wait_gone(child)


def _wait_gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def _files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def launched_grid(run, tmp: Path) -> tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """The launched grid ``tmp / "launched"`` with one job killed, then its rerun (conftest's background lane)."""
    out = tmp / "launched"
    command = [sys.executable, "-m", "ducat", *LAUNCHED, "--out", str(out)]
    killed = run(command, DUCAT_TEST_CRASH_AT="replaced:epoch_1.pt.sha256", OMP_NUM_THREADS="1")
    killed.files = _files(out)  # what the first invocation left, before the rerun adds to it
    killed.last_epoch = load_checkpoint(out / "runs" / KILLED / "last.pt")["epoch"]
    return out, killed, run(command, OMP_NUM_THREADS="1")


BACKGROUND_READS = ("smoke_grid",)
BACKGROUND = {"launched_grid": launched_grid} if HAS_DASK else {}


@pytest.fixture(scope="module")
def grids(background):
    """The sequential grid (conftest's shared ``smoke_grid``), the launched grid with one job killed, and the
    launched grid's rerun, all run in conftest's background lane."""
    if not HAS_DASK:
        pytest.skip(f"Dask is not installed: {INSTALL}")
    sequential = background.result("smoke_grid")
    assert sequential.returncode == 0, sequential.stderr[-2000:]
    launched, killed, rerun = background.result("launched_grid")
    return launched, sequential.out, killed, rerun


@pytest.mark.slow
def test_a_job_killed_midway_is_reported_with_its_log_and_the_other_jobs_finish(grids):
    out, _, killed, _ = grids
    log = out / "logs" / f"train-{KILLED}.log"
    assert killed.returncode == 2, killed.stderr[-2000:]
    error = killed.stderr.strip().splitlines()[-1]
    print(error)
    assert error.startswith(f"ducat: error: 1 of 29 jobs failed: train-{KILLED} was killed by SIGKILL (signal 9); "
                            f"log: {log}; 8 jobs that need them were not run; "), error
    assert any(line.endswith(f"FAILED train-{KILLED} was killed by SIGKILL (signal 9); log: {log}")
               for line in (line.split(" | ")[0] for line in killed.stderr.splitlines())), killed.stderr  # live
    files = killed.files
    for name in NEEDS_KILLED:
        assert f"not run train-{name} (needs train-{KILLED})" in killed.stderr
        assert not any(f.startswith(f"runs/{name}/") for f in files)
    # killed while writing its epoch-1 fork checkpoint (checksum in place, data not): last.pt is epoch 1
    assert killed.last_epoch == 1 and f"runs/{KILLED}/epoch_1.pt" not in files
    others = {f.split("/")[1] for f in files if f.startswith("runs/")} - {KILLED}
    assert len(others) == 12
    for name in others:  # every job that did not need the killed one finished: trained, and evaluated
        assert f"runs/{name}/" + ("epoch_2.pt" if name.startswith("trunk-") else "eval/report.json") in files, name
    assert "report.md" not in files


@pytest.mark.slow
def test_the_rerun_resumes_the_killed_job_and_submits_only_what_is_missing(grids):
    out, _, _, rerun = grids
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "launcher local: 9 jobs to run (20 done before)" in rerun.stdout
    started = [line.split(" started ")[1].split(" |")[0] for line in rerun.stderr.splitlines() if " started " in line]
    missing = [f"train-{KILLED}", *[f"{kind}-{name}" for name in NEEDS_KILLED for kind in ("train", "eval")]]
    assert sorted(started) == sorted(missing)
    attempts = (out / "logs" / f"train-{KILLED}.log").read_text().split(f"==== train-{KILLED}: started")[1:]
    assert len(attempts) == 2 and f"{KILLED}: training" in attempts[0] and f"{KILLED}: resuming" in attempts[1]
    assert "was killed by SIGKILL" in attempts[0] and "exited with code 0" in attempts[1]
    assert (out / "report.md").is_file()


@pytest.mark.slow
def test_the_launched_grid_gives_the_sequential_results_mask_for_mask(grids):
    launched, sequential, _, rerun = grids
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads((launched / "results.json").read_text()) == json.loads((sequential / "results.json").read_text())
    masks = sorted(p.relative_to(sequential) for p in sequential.glob("runs/*/eval/masks.npz"))
    assert len(masks) == 12
    for path in masks:
        with np.load(sequential / path) as a, np.load(launched / path) as b:
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                assert np.array_equal(a[key], b[key]), (path, key)
    for path in sorted(sequential.glob("runs/*/model.safetensors")):  # the weights too, the killed trunk's forks'
        a, b = load_file(path), load_file(launched / path.relative_to(sequential))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path
    print(f"{len(masks)} runs: results.json and every per-example mask equal")
