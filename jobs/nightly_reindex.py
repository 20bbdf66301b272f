"""The nightly incremental re-index: tag only new or changed images, update the index.

    ray job submit --working-dir . -- python jobs/nightly_reindex.py --manifest s3://bucket/catalog/today.parquet \
        --model s3://bucket/models/v3 --table /mnt/tag_table --index /mnt/index
"""

import sys
from pathlib import Path

# Runnable from a plain checkout too (ray job submit --working-dir . ships the source, not an install).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mltag.cli import run_stage
from mltag.config import parse_config
from mltag.runtime import log
from mltag.stages.reindex import ReindexConfig, run

if __name__ == "__main__":
    log.configure()
    sys.exit(run_stage("jobs/nightly_reindex.py", run, parse_config(ReindexConfig, sys.argv[1:], prog="jobs/nightly_reindex.py")))
