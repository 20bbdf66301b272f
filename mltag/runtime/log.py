"""One console format for mltag: every module logs through ``logging.getLogger(__name__)``.

Status and progress go to stderr through the ``mltag`` logger; what a command *answers* (a
search's neighbours, a query's rows) stays on stdout, so ``mltag search ... > out.txt`` holds
only the answer. ``configure`` is idempotent and is called once per process: by the CLI in the
driver, and at the top of code that runs in Ray workers (whose stderr Ray forwards to the driver,
prefixed with the worker's name).

The handler looks ``sys.stderr`` up at each record instead of binding it at set-up: pytest's
capture, Jupyter and Ray's log redirection all swap the stream after import.
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"
LEVEL_ENV = "MLTAG_LOG_LEVEL"  # DEBUG | INFO | WARNING ... ; INFO when unset


class _CurrentStderr(logging.StreamHandler):
    """A StreamHandler writing to whatever ``sys.stderr`` is when the record is emitted."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # logging assigns it in __init__; the property wins
        pass


def configure(level: str | int | None = None) -> logging.Logger:
    """Give the ``mltag`` logger its one handler (once) and set its level; returns it."""
    logger = logging.getLogger("mltag")
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
        logger.addHandler(handler)
        # Our handler is the only one: a root handler installed by a library (or by basicConfig
        # in a user's script) would print every line a second time.
        logger.propagate = False
    chosen = level if level is not None else os.environ.get(LEVEL_ENV, "INFO")
    logger.setLevel(chosen.upper() if isinstance(chosen, str) else chosen)
    return logger
