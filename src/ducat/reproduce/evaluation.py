"""The evaluation of one run of a reproduction, shared by the sequential path (:func:`.results.evaluate_runs`)
and a launcher's evaluation jobs (:mod:`.jobs`), so that both evaluate with the same settings. Kept apart
from :mod:`.results` so that a job does not load what the report needs (scipy, matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ducat.eval import evaluate_checkpoint
from ducat.reproduce.grid import GridRun
from ducat.reproduce.scales import Scale


def eval_settings(run: GridRun, scale: Scale, workers: int | None) -> dict[str, Any]:
    """The :class:`~ducat.eval.plan.EvalSettings` fields of one run's evaluation in a reproduction: the one
    place they are chosen, for the sequential path and for a launcher's evaluation jobs alike. ``workers``:
    evaluation processes (None: the default, one per torch thread on a CPU); results depend on it."""
    attacks = scale.ablation_attacks if run.group == "ablation" else scale.eval_attacks
    return {"n_examples": scale.eval_examples, "attacks": attacks, "n_targets": scale.n_targets,
            "margin_restarts": scale.margin_restarts, "dawa_steps": scale.dawa_steps, "workers": workers,
            "equal_effort": scale.equal_effort, "autoattack": scale.autoattack, **scale.eval_checks}


def evaluate_run(run: GridRun, scale: Scale, out: Path, data_root: str | None, workers: int | None) -> None:
    """Evaluate one trained run into ``RUN/eval`` (attacks already in its cache are not run again)."""
    run_dir = out / "runs" / run.name
    evaluate_checkpoint(run_dir, out=run_dir / "eval", eps=scale.eval_eps, data_root=data_root, progress=False,
                        settings=eval_settings(run, scale, workers))


def evaluated(run: GridRun, scale: Scale, out: Path, workers: int | None) -> bool:
    """Whether ``RUN/eval/report.json`` holds this run's evaluation with the settings a reproduction asks for
    (the number of workers compared only when given), so that a launcher need not start a job for it."""
    try:
        found = json.loads((out / "runs" / run.name / "eval" / "report.json").read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    wanted = {k: list(v) if isinstance(v, tuple) else v for k, v in eval_settings(run, scale, workers).items()
              if v is not None}  # as report.json holds them: tuples as lists
    if scale.eval_eps is not None:
        wanted["eps"] = scale.eval_eps
    return all(found.get(k) == v for k, v in wanted.items())
