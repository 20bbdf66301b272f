"""What a person reads: each line once, no warnings. The helpers here count lines as they stay on
the screen; test_end_to_end applies them to the consoles of the pipeline's jobs (training, tagging,
indexing) as a user runs them (issue 17: epoch lines printed twice, Ray Train's report dicts, numpy
and torch warnings, a Ray deprecation warning, Ray Data's "Progress bars disabled" notices)."""

from __future__ import annotations

import collections
import re

import pytest

ANSI = re.compile(r"\x1b\[[0-9;]*m")
RAY_PREFIX = re.compile(r"^\((?P<source>[\w.:-]+) pid=\d+(?:, ip=[\d.]+)?\) ?")
# Ray's own controller reports on the cluster's health (a resource request that timed out on a
# busy machine); what it says may repeat and is not the training's console. Its lines are still
# searched for warnings. (The placement-group cleaner is not excused: its State API lookups
# failed every second when mltag's own instance ran without the dashboard.)
CLUSTER_HEALTH_SOURCES = ("TrainController",)


def finished_lines(text: str) -> list[str]:
    """Each line as it stays on the screen: a progress bar redraws its line after carriage
    returns, and only the last drawing remains. Colour codes are dropped."""
    return [ANSI.sub("", line.split("\r")[-1]).rstrip() for line in text.split("\n")]


def repeated_lines(text: str) -> dict[str, int]:
    """Non-blank lines that appear more than once (a Ray prefix with nothing after it is blank)."""
    counts = collections.Counter()
    for line in finished_lines(text):
        prefix = RAY_PREFIX.match(line)
        if prefix and prefix.group("source") in CLUSTER_HEALTH_SOURCES:
            continue
        if (line[prefix.end() :] if prefix else line).strip():
            counts[line] += 1
    return {line: n for line, n in counts.items() if n > 1}


@pytest.mark.parametrize(
    "text,repeated",
    [
        ("a\nb\n", {}),
        ("epoch 1\nepoch 1\n", {"epoch 1": 2}),
        ("bar 1%\rbar 50%\rbar 100%\nbar 100%\n", {"bar 100%": 2}),  # redraws are not lines
        ("bar 1%\rbar 100%\nnext\n", {}),
        ("(RayTrainWorker pid=7) \n(RayTrainWorker pid=7) \n", {}),  # blank after the prefix
        ("\x1b[36m(TrainController pid=3)\x1b[0m   ray.get(\n\x1b[36m(TrainController pid=3)\x1b[0m   ray.get(\n", {}),
    ],
)
def test_repeated_lines_are_counted_as_a_person_sees_them(text, repeated):
    assert repeated_lines(text) == repeated
