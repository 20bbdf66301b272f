"""Train a tagger on a Ray cluster (or locally).

ray job submit --working-dir . -- python jobs/train.py --config configs/demo.yaml
python jobs/train.py --manifest catalog/manifest.parquet --epochs 3
"""

import sys
from pathlib import Path

# Runnable from a plain checkout too (ray job submit --working-dir . ships the source, not an install).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mltag.cli import run_stage
from mltag.config import parse_config
from mltag.runtime import log
from mltag.stages.train import TrainConfig, run

if __name__ == "__main__":
    log.configure()
    sys.exit(run_stage("jobs/train.py", run, parse_config(TrainConfig, sys.argv[1:], prog="jobs/train.py")))
