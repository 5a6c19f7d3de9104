"""tune stage: a Ray Tune sweep (slowness-penalty weight x frame rate) over the Ray Train driver.

    python -m pipeline.tune --params params.yaml --features data/features --bpe data/bpe/bpe.model \
        --codebook data/codebook --out reports/tune.json --plot reports/tune.png

Writes the best trial and every trial (config, objective, steps, status, MLflow run) to ``--out``
and the objective against the slowness weight, one line per frame rate, to ``--plot``. As many trials
run at once as ``tune.max_concurrent_trials`` says (params.yaml: 2); their checkpoints go to ``--work-dir``,
from which an interrupted sweep resumes when the stage runs again with the same inputs (it writes
no report and exits 130 when interrupted; ``--restart`` starts over).
The same sweep runs on a cluster with ``ray job submit -- python -m ray_jobs.tune`` (docs/scaling.md).
"""

from __future__ import annotations

import sys

from meld.config import run_stage
from ray_jobs.tune import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_stage("tune", main))
