"""Curate a labelled catalog (pseudo-labels, tag pruning and merging, a label-issue review queue).

ray job submit --working-dir . -- python jobs/curate.py --manifest catalog/manifest_folds.parquet --oof runs/oof/oof.parquet --out runs/curated
"""

import sys
from pathlib import Path

# Runnable from a plain checkout too (ray job submit --working-dir . ships the source, not an install).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mltag.cli import run_stage
from mltag.config import parse_config
from mltag.runtime import log
from mltag.stages.curate import CurateConfig, run

if __name__ == "__main__":
    log.configure()
    sys.exit(run_stage("jobs/curate.py", run, parse_config(CurateConfig, sys.argv[1:], prog="jobs/curate.py")))
