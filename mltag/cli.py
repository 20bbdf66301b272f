"""``mltag <stage>``: each subcommand resolves its config (defaults -> --config YAML -> flags)
and calls the same ``run(config)`` that the ``jobs/`` entrypoints call.

    mltag sample --out catalog
    mltag train  --manifest catalog/manifest.parquet --out runs/train
    mltag eval   --manifest catalog/manifest.parquet --model runs/train/model --out runs/eval
    mltag calibrate --manifest catalog/manifest.parquet --model runs/train/model --target 0.9
    mltag report --model runs/train/model --eval runs/eval --out runs/report
    mltag tag    --manifest catalog/manifest.parquet --model runs/train/model --out runs/tag_table
    mltag reindex --manifest catalog/today.parquet --model runs/train/model --table runs/tag_table
    mltag history --table runs/tag_table
    mltag index  --tag-table runs/tag_table --out runs/index   [--as-of 2026-11-20]
    mltag search --index runs/index --listing-id L000042
    mltag demo   --out demo_out
"""

from __future__ import annotations

import argparse
import sys
import functools
from typing import Callable, Sequence

from mltag.config import ConfigError, add_config_arguments, config_from_args


def _stages() -> dict[str, tuple[type, Callable]]:
    # Imported lazily so `mltag --help` stays fast and a stage's heavy imports load only when used.
    from mltag import anomalies, demo, duplicates, evaluate, history, index, reindex, report, sample, tag, thresholds, train
    from mltag.cluster import on_worker

    def worker(fn: Callable) -> Callable:  # a step whose memory grows with the catalog runs on a worker, not here
        return functools.partial(on_worker, fn)

    return {
        "sample": (sample.SampleConfig, sample.run),
        "train": (train.TrainConfig, train.run),
        "eval": (evaluate.EvalConfig, evaluate.run),
        "calibrate": (thresholds.CalibrateConfig, thresholds.run),
        "report": (report.ReportConfig, report.run),
        "tag": (tag.TagConfig, tag.run),
        "reindex": (reindex.ReindexConfig, reindex.run),
        "history": (history.HistoryConfig, history.run),
        "index": (index.IndexConfig, worker(index.build_index)),
        "index-update": (index.IndexUpdateConfig, worker(index.update_index)),
        "search": (index.SearchConfig, index.run_search),
        "anomalies": (anomalies.AnomalyConfig, worker(anomalies.run)),
        "duplicates": (duplicates.DuplicatesConfig, worker(duplicates.run)),
        "demo": (demo.DemoConfig, demo.run),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mltag", description="Tag, embed and search very large image catalogs on Ray.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (config_cls, _) in _stages().items():
        stage = sub.add_parser(name, help=(config_cls.__doc__ or "").strip().splitlines()[0])
        add_config_arguments(stage, config_cls)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config_cls, run = _stages()[args.stage]
    try:
        config = config_from_args(config_cls, args)
    except (ConfigError, ValueError) as exc:
        print(f"mltag {args.stage}: {exc}", file=sys.stderr)
        return 2
    from mltag.delta_table import TableConflictError, TableNotFoundError
    from mltag.tag import ErrorGateError

    try:
        run(config)
    except (ErrorGateError, TableConflictError, TableNotFoundError) as exc:
        # Job-level failures with a message a person can act on: no traceback, a non-zero exit.
        print(f"mltag {args.stage}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
