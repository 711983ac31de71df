#!/usr/bin/env python
"""Where standard AutoAttack spends its time on the model ``ducat eval`` attacks.

Runs pyautoattack's standard version (APGD-CE, APGD-T, FAB-T, Square with 5000 queries) once, on
the view of a run's model that a ``ducat eval`` attack takes its gradients from (default: the
projected classifier, as the adaptive AutoAttack row does), with BatchNorm folded as there, on the
first ``--n-examples`` test images in one batch, and prints AutoAttack's own log: robust accuracy and
cumulative time after each stage. The stages after APGD-CE run only on the examples still robust, so
on a model that resists most inputs FAB-T and Square run in full: that is the floor of any default
attack set that includes a standard AutoAttack.

    python benchmarks/autoattack_stages.py RUN_DIR                 # the projected classifier
    python benchmarks/autoattack_stages.py RUN_DIR --view raw      # the raw 2C logits (paper protocol)

Run it on an idle machine: it prints the load average at start.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from ducat.runtime import prepare_environment

VIEWS = {"projected": "MAX_MERGED", "raw": "RAW", "logsumexp": "LSE_MERGED"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="ducat run directory or checkpoint")
    parser.add_argument("--view", choices=VIEWS, default="projected")
    parser.add_argument("--n-examples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: ducat's)")
    args = parser.parse_args()
    prepare_environment()  # ducat's wait policy, set before torch loads, as in `ducat eval`
    import torch
    from pyautoattack import AutoAttack

    from ducat.data import load_split
    from ducat.eval.attacks import model_views
    from ducat.eval.plan import View
    from ducat.runs import model_from_checkpoint, resolve_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average at start (1/5/15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    model, config, _ = model_from_checkpoint(resolve_checkpoint(args.run))
    model.eval()
    test = load_split(config.data.dataset, config.data.root, train=False)
    x, y = test.images[:args.n_examples].float() / 255, test.labels[:args.n_examples]
    views = model_views(model)
    if View[VIEWS[args.view]] not in views:
        parser.error(f"a model without dummy classes has no {args.view} view")
    view = views[View[VIEWS[args.view]]]
    print(f"run: {args.run}; view: {args.view}; {len(y)} examples, one batch; L-inf eps {config.attack.eps}")
    aa = AutoAttack(view, eps=config.attack.eps, norm="Linf", seed=0, version="standard")
    aa.logger.addHandler(logging.StreamHandler(sys.stdout))
    aa.logger.setLevel(logging.DEBUG)
    start = time.perf_counter()
    aa.run_standard_evaluation(x, y, batch_size=len(y))
    print(f"AutoAttack wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
