"""``ducat reproduce --launcher``: the grid's runs spread over a Dask cluster, on this machine or on SLURM.

The engine is Dask distributed, with dask-jobqueue for SLURM (``docs/cluster.md`` says why), an optional
dependency: ``pip install -e ".[cluster]"``. The grid's jobs are in :mod:`.jobs`, how they run in
:mod:`.engine`; this module holds the launcher's settings and makes its cluster:

- ``local``: one Dask worker per GPU of this machine, each with its own ``CUDA_VISIBLE_DEVICES``, or on a
  CPU ``--jobs`` workers, each job with ``--threads`` torch threads. Scheduler and workers listen on
  127.0.0.1 only (so does the scheduler's web dashboard, on a free port, with either launcher).
- ``slurm``: each worker is a SLURM job submitted by dask-jobqueue from this machine (partition, time
  limit, GPUs, cores and memory per job, any other ``#SBATCH`` line), ``--jobs`` of them (or fewer when
  fewer jobs are left), kept until the grid's jobs are done. The compute nodes need this Python
  environment and ``--out`` on a shared file system, and must reach this machine's scheduler
  (``interface`` picks the network).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from ducat import runtime
from ducat.config import ConfigError

LAUNCHERS = {"local": ("distributed",), "slurm": ("distributed", "dask_jobqueue")}
INSTALL = 'pip install -e ".[cluster]"'
SLURM_JOBS = 8  # default most SLURM jobs at a time


@dataclass(frozen=True)
class Launcher:
    """How to spread the grid: ``kind`` (local | slurm), at most ``jobs`` at a time, each with ``threads``
    torch threads and ``workers`` evaluation processes (None: chosen per machine); SLURM's settings."""

    kind: str
    jobs: int | None = None
    threads: int | None = None
    workers: int | None = None
    partition: str | None = None
    gpus_per_job: int = 1
    time_limit: str | None = None
    cores_per_job: int = 8
    memory: str = "32GB"
    account: str | None = None
    interface: str | None = None
    directives: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()


SLURM_FIELDS = tuple(f.name for f in fields(Launcher) if f.name not in ("kind", "threads", "workers"))


def check_engine(kind: str) -> None:
    """ConfigError (before anything runs) when the packages of launcher ``kind`` are not installed."""
    missing = [name for name in LAUNCHERS[kind] if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"--launcher {kind} needs {' and '.join(missing)} (Dask), which is not installed; "
                          f"install it with: {INSTALL}")


def read_cluster_config(path: Path) -> dict[str, Any]:
    """The SLURM settings of a YAML file (keys: :data:`SLURM_FIELDS`), each checked; ConfigError, one line."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"--cluster-config '{path}': cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--cluster-config '{path}' is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--cluster-config '{path}' must be a mapping of settings, e.g. 'partition: gpu'")
    unknown = [key for key in data if key not in SLURM_FIELDS]
    if unknown:
        raise ConfigError(f"--cluster-config '{path}': unknown setting '{unknown[0]}'; "
                          f"choose from: {', '.join(SLURM_FIELDS)}")
    for key, value in data.items():
        data[key] = _checked(key, value, f"--cluster-config '{path}': {key}")
    return data


def _checked(key: str, value: Any, where: str) -> Any:
    """One SLURM setting with the type of its :class:`Launcher` field (lists as tuples of strings)."""
    if key in ("directives", "setup"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings")
        return tuple(value)
    if key in ("jobs", "gpus_per_job", "cores_per_job"):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "gpus_per_job" else 1):
            raise ConfigError(f"{where} must be an integer >= {0 if key == 'gpus_per_job' else 1}, got {value!r}")
        return value
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if key == "time_limit" and not re.fullmatch(r"(\d+-)?\d+(:\d\d){0,2}", str(value)):
        raise ConfigError(f"{where}: '{value}' is not a SLURM time (MINUTES, HH:MM:SS or DAYS-HH:MM:SS)")
    return str(value)


def slurm_launcher(base: Launcher, config_file: Path | None, flags: dict[str, Any]) -> Launcher:
    """``base`` with the settings of ``config_file`` and then of the command line's ``flags`` (those given);
    ConfigError when no time limit is set or ``sbatch`` is not on the PATH."""
    settings = read_cluster_config(config_file) if config_file is not None else {}
    settings.update({k: _checked(k, v, f"--{k.replace('_', '-')}") for k, v in flags.items() if v is not None})
    launcher = replace(base, **settings)
    if launcher.time_limit is None:
        raise ConfigError("--launcher slurm needs a time limit per job: --time-limit HH:MM:SS (or time_limit in "
                          "--cluster-config); a run cut by it resumes when the command is run again")
    if shutil.which("sbatch") is None:
        raise ConfigError("--launcher slurm: 'sbatch' is not on the PATH; run ducat on a SLURM login node")
    return launcher


def gpu_ids(device: str) -> list[str]:
    """The GPUs the runs will use on this machine (``CUDA_VISIBLE_DEVICES`` names), none on a CPU run."""
    if device == "cpu" or not torch.cuda.is_available():
        return []
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return (visible or [str(i) for i in range(torch.cuda.device_count())])[:torch.cuda.device_count()]


def local_slots(launcher: Launcher, device: str) -> tuple[list[dict[str, str]], int]:
    """The environment of each local worker (one GPU each, round robin when ``jobs`` exceeds the GPUs) and
    each job's torch threads: by default one job per GPU, or on a CPU one single-threaded job per core."""
    gpus, cores = gpu_ids(device), runtime.usable_cores()
    count = launcher.jobs or (len(gpus) if gpus else max(1, cores // (launcher.threads or 1)))
    slots = [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else {} for i in range(count)]
    return slots, launcher.threads or max(1, cores // count)


def local_cluster(slots: list[dict[str, str]]) -> Any:
    """A Dask cluster on this machine: one single-threaded worker process (one job at a time) per slot, with
    the slot's environment, listening on 127.0.0.1 only, its own logs silenced."""
    from distributed import Nanny, Scheduler, SpecCluster  # the engine is optional (ducat[cluster])

    workers = {f"slot-{i}": {"cls": Nanny, "options": {
        "nthreads": 1, "host": "127.0.0.1", "env": env, "memory_limit": 0,
        "silence_logs": logging.CRITICAL}} for i, env in enumerate(slots)}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.CRITICAL, name="ducat")


def slurm_cluster(launcher: Launcher, log_dir: Path, count: int) -> Any:
    """A Dask cluster whose workers are SLURM jobs, each running one job at a time: ``count`` of them (at most
    ``launcher.jobs``), one submitted again with ``sbatch`` when one ends; their own output goes to
    ``log_dir``."""
    from dask_jobqueue import SLURMCluster  # the engine is optional (ducat[cluster])

    gres = [f"--gres=gpu:{launcher.gpus_per_job}"] if launcher.gpus_per_job else []
    cluster = SLURMCluster(
        job_name="ducat", queue=launcher.partition, account=launcher.account, walltime=launcher.time_limit,
        cores=1, processes=1, job_cpu=launcher.cores_per_job, memory=launcher.memory,
        interface=launcher.interface, job_extra_directives=[*gres, *launcher.directives],
        job_script_prologue=list(launcher.setup), log_directory=str(log_dir),
        scheduler_options={"dashboard_address": "127.0.0.1:0"}, silence_logs="critical")
    cluster.adapt(minimum_jobs=count, maximum_jobs=count)  # adapt, not scale: a job that ends is replaced
    return cluster
