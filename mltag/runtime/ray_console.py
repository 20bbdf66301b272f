"""What of Ray's console output training turns down, and why: one place to revisit when Ray changes.

Training runs the same datasets every epoch and reports every epoch; Ray says something each
time (a progress bar, an execution plan, the reported metrics dict), which buries the one line
per epoch a person wants. Only chatter goes: Ray's warnings and errors still show.

    train_ds = quiet_per_epoch(train_ds)      # on the driver, before the trainer gets it
    with progress_notices_off(): ...          # around Ray Data work with bars turned off
    quiet_ray_train_reports()                 # at the top of each training worker
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

# Ray Data's logger for its progress managers' one-time notices ("Progress bars disabled. To
# enable, set ..."): said once per process when bars are off, which they are on purpose here.
RAY_DATA_PROGRESS_NOTICES = "ray.data._internal.progress"


def quiet_per_epoch(ds):
    """``ds``, which workers run again every epoch, without Ray Data's progress bars and
    execution plans: they would repeat each epoch, and rank 0 shows the epoch's progress itself.
    The settings belong to this dataset's own DataContext (and to datasets derived from it), not
    to the process."""
    ds.context.enable_progress_bars = False
    ds.context.print_on_execution_start = False
    return ds


@contextlib.contextmanager
def progress_notices_off() -> Iterator[None]:
    """Within the block, Ray Data does not announce that progress bars are off."""
    notices = logging.getLogger(RAY_DATA_PROGRESS_NOTICES)
    level = notices.level
    notices.setLevel(logging.ERROR)
    try:
        yield
    finally:
        notices.setLevel(level)


def quiet_ray_train_reports() -> None:
    """Ray Train logs every ``ray.train.report`` at INFO ("Reporting training result ...": the
    checkpoint and the whole metrics dict, a line per epoch) through a logger named after its
    source file rather than under ``ray.train``, so ``RunConfig(logging_config=LoggingConfig(...))``,
    which quiets the rest of Ray Train's INFO lines, cannot reach it. Call in the worker process."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout, where LoggingConfig may well reach it
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
