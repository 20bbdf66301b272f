"""Tag a whole catalog into the Parquet tag table on a Ray cluster (or locally).

    ray job submit --working-dir . -- python jobs/tag_catalog.py --manifest s3://bucket/manifest.parquet \
        --model s3://bucket/models/v1 --out s3://bucket/tag_table
"""

import sys
from pathlib import Path

# Runnable from a plain checkout too (ray job submit --working-dir . ships the source, not an install).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mltag.cli import run_stage
from mltag.config import parse_config
from mltag.runtime import log
from mltag.stages.tag import TagConfig, run

if __name__ == "__main__":
    log.configure()
    sys.exit(run_stage("jobs/tag_catalog.py", run, parse_config(TagConfig, sys.argv[1:], prog="jobs/tag_catalog.py")))
