#!/usr/bin/env python
"""What the environment of a launched job costs a PGD training step: with and without Dask's nanny variables.

``ducat reproduce --launcher`` runs each job as a subprocess of a Dask worker. Dask's nanny writes
``distributed.nanny.pre-spawn-environ`` (``MALLOC_TRIM_THRESHOLD_=65536`` and thread counts) into its own
environment before it starts that worker, so a job inherits it unless ``ducat.reproduce.engine.job_environment``
drops it. Setting glibc's trim threshold turns off its adaptive mmap threshold: every freed tensor above 128 KiB
goes back to the kernel and the next allocation page-faults it in again.

For each environment the script starts a worker process (glibc reads the variables at process start) that runs
``--steps`` PGD-10 training steps of small_cnn on a batch of 128 28x28 images on one thread, after one warm-up
step, and reports minor page faults per step, the kernel's share of its CPU time and the wall time per step.
Environments: ``nanny`` (this environment with Dask's ``pre-spawn-environ`` written in, as a worker has it and
as a job inherited it before) and ``job`` (what ``job_environment`` makes of it for a launched job now).
The last line reads ``nanny/job: wall ratio R.RRx, faults ratio F.Fx``.

Page faults and the kernel's share do not depend on what else runs; the wall ratio does, so the script prints the
load average first: run it on an idle machine (``uptime``).

    python benchmarks/job_environment.py             # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def worker(steps: int) -> dict[str, float]:
    """Run PGD-10 training steps of small_cnn (batch 128, 1x28x28, one thread); returns per-step figures."""
    import torch
    import torch.nn.functional as F

    from ducat.attacks.pgd import PGD
    from ducat.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    attack = PGD(model, eps=0.1, step_size=0.025, steps=10)
    x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))

    def step() -> None:
        x_adv = attack(x, y)
        optimizer.zero_grad()
        F.cross_entropy(model(x_adv), y).backward()
        optimizer.step()

    step()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    kernel, user = after.ru_stime - before.ru_stime, after.ru_utime - before.ru_utime
    return {"faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "kernel_share": kernel / (kernel + user), "wall_per_step_s": wall / steps}


def measure(env: dict[str, str], steps: int) -> dict[str, float]:
    """``worker(steps)`` in a fresh process with environment ``env``."""
    out = subprocess.run([sys.executable, __file__, "--worker", str(steps)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per environment (default 10)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker)))
        return
    print(f"load average before: {os.getloadavg()[0]:.2f} (run on an idle machine for the wall ratio)")
    import dask
    import distributed  # noqa: F401 -- registers the nanny's configuration

    from ducat.reproduce.engine import Job, job_environment

    spawn = dask.config.get("distributed.nanny.pre-spawn-environ")
    os.environ.update({name: str(value) for name, value in spawn.items() if value is not None})  # as the nanny does
    job = job_environment(Job("benchmark", (), Path("benchmark.log")))
    results = {"job": measure(job, args.steps), "nanny": measure(dict(os.environ), args.steps)}
    for name, r in results.items():
        print(f"{name:6s} faults/step {r['faults_per_step']:9.0f}  kernel share {100 * r['kernel_share']:4.1f}%  "
              f"wall/step {r['wall_per_step_s']:.3f} s")
    job_r, nanny_r = results["job"], results["nanny"]
    print(f"nanny/job: wall ratio {nanny_r['wall_per_step_s'] / job_r['wall_per_step_s']:.2f}x, "
          f"faults ratio {nanny_r['faults_per_step'] / max(job_r['faults_per_step'], 1):.1f}x")


if __name__ == "__main__":
    main()
