"""Out-of-fold scores for a folded catalog (one training run per fold) on a Ray cluster (or locally).

ray job submit --working-dir . -- python jobs/oof.py --manifest catalog/manifest_folds.parquet --train-config configs/demo.yaml --out runs/oof
"""

import sys
from pathlib import Path

# Runnable from a plain checkout too (ray job submit --working-dir . ships the source, not an install).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mltag.cli import run_stage
from mltag.config import parse_config
from mltag.runtime import log
from mltag.stages.oof import OofConfig, run

if __name__ == "__main__":
    log.configure()
    sys.exit(run_stage("jobs/oof.py", run, parse_config(OofConfig, sys.argv[1:], prog="jobs/oof.py")))
