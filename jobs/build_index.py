"""Build the FAISS similarity index from a committed tag table.

ray job submit --working-dir . -- python jobs/build_index.py --tag-table runs/tag_table --out runs/index
"""

import sys
from pathlib import Path

# Runnable from a plain checkout too (ray job submit --working-dir . ships the source, not an install).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mltag.cli import run_stage
from mltag.config import parse_config
from mltag.runtime import log
from mltag.runtime.cluster import on_worker
from mltag.stages.index_build import IndexConfig, run

if __name__ == "__main__":
    log.configure()
    # The driver stays small: the index (every embedding) is built on a worker.
    config = parse_config(IndexConfig, sys.argv[1:], prog="jobs/build_index.py")
    sys.exit(run_stage("jobs/build_index.py", lambda c: on_worker(run, c), config))
