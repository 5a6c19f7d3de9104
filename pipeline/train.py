"""train stage: Ray Train (TorchTrainer, DDP) for one system on the local Ray cluster.

    python -m pipeline.train --params params.yaml --system meld --features data/features \
        --bpe data/bpe/bpe.model --codebook data/codebook --out models/meld

The same driver is what ``ray job submit -- python -m ray_jobs.train`` runs on a cluster.
An interrupted run resumes from ``<out>/checkpoints`` when its configuration is unchanged.
"""

from __future__ import annotations

import sys

from meld.config import run_stage
from ray_jobs.train import main

if __name__ == "__main__":
    sys.exit(run_stage("train", main))
