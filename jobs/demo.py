"""The whole demo (sample -> train -> tag -> index -> search) as one Ray job.

ray job submit --working-dir . -- python jobs/demo.py --out /tmp/mltag_demo
"""

import sys
from pathlib import Path

# Runnable from a plain checkout too (ray job submit --working-dir . ships the source, not an install).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mltag.cli import run_stage
from mltag.config import parse_config
from mltag.runtime import log
from mltag.stages.demo import DemoConfig, run

if __name__ == "__main__":
    log.configure()
    sys.exit(run_stage("jobs/demo.py", run, parse_config(DemoConfig, sys.argv[1:], prog="jobs/demo.py")))
