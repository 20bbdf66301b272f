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
    mltag serve  --model runs/train/model --index runs/index [--chain chain.yaml]
    mltag train-head --tag-table runs/tag_table --labels new_tags.csv --out runs/heads/sleeves
    mltag apply-head --tag-table runs/tag_table --head runs/heads/sleeves
    mltag demo   --out demo_out
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mltag.config import ConfigError, add_config_arguments, config_from_args


@dataclass(frozen=True)
class Stage:
    """A subcommand: where its config class and entry point live, imported only when it runs (or
    its own --help is asked for), so `mltag --help` never loads torch, timm, Ray or FAISS."""

    config: str  # "module:ConfigClass"
    run: str  # "module:function"
    help: str  # one line for `mltag --help` (a test keeps it equal to the config's docstring)
    on_worker: bool = False  # its memory grows with the catalog: run as a Ray task, not in this driver

    def load(self) -> tuple[type, Callable]:
        config_cls, run = _resolve(self.config), _resolve(self.run)
        if self.on_worker:
            from mltag.runtime.cluster import on_worker

            run = functools.partial(on_worker, run)
        return config_cls, run


def _resolve(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


STAGES: dict[str, Stage] = {
    "sample": Stage(
        "mltag.stages.sample:SampleConfig",
        "mltag.stages.sample:run",
        "Build the offline sample catalog (real photos + real handwritten digits).",
    ),
    "train": Stage(
        "mltag.stages.train:TrainConfig",
        "mltag.stages.train:run",
        "Train a multi-label tagger with Ray Train (TorchTrainer fed by Ray Data).",
    ),
    "eval": Stage(
        "mltag.stages.evaluate:EvalConfig",
        "mltag.stages.evaluate:run",
        "Evaluate a tagger on a labelled manifest: metrics JSON and a per-tag Parquet.",
    ),
    "calibrate": Stage(
        "mltag.stages.calibrate:CalibrateConfig",
        "mltag.stages.calibrate:run",
        "Choose per-tag thresholds on a validation split and save them with the model.",
    ),
    "report": Stage(
        "mltag.stages.report:ReportConfig",
        "mltag.stages.report:run",
        "Write an HTML report (PNG figures + metrics table) for a trained and evaluated tagger.",
    ),
    "tag": Stage(
        "mltag.stages.tag:TagConfig",
        "mltag.stages.tag:run",
        "Tag every image of a catalog manifest into the Delta tag table (one commit per run).",
    ),
    "reindex": Stage(
        "mltag.stages.reindex:ReindexConfig",
        "mltag.stages.reindex:run",
        "Nightly incremental re-index: tag only new, changed or transiently failed images; one MERGE.",
    ),
    "history": Stage(
        "mltag.stages.history:HistoryConfig", "mltag.stages.history:run", "List a tag table's versions with each run's metadata."
    ),
    "index": Stage(
        "mltag.stages.index_build:IndexConfig",
        "mltag.stages.index_build:run",
        "Build a FAISS similarity index from a committed tag table.",
        on_worker=True,
    ),
    "index-update": Stage(
        "mltag.stages.index_update:IndexUpdateConfig",
        "mltag.stages.index_update:run",
        "Bring an index to a newer version of its tag table, or remove listings, without a rebuild.",
        on_worker=True,
    ),
    "search": Stage(
        "mltag.stages.index_search:SearchConfig",
        "mltag.stages.index_search:run",
        "Find the listings most similar to a listing id or an image.",
    ),
    "anomalies": Stage(
        "mltag.stages.anomalies:AnomalyConfig",
        "mltag.stages.anomalies:run",
        "Score every listing by its kNN distance and write the outlier table.",
        on_worker=True,
    ),
    "duplicates": Stage(
        "mltag.stages.duplicates:DuplicatesConfig",
        "mltag.stages.duplicates:run",
        "Group near-duplicate listings by embedding similarity.",
        on_worker=True,
    ),
    "serve": Stage(
        "mltag.stages.serve:ServeConfig",
        "mltag.stages.serve:run",
        "Serve tagging and similar-listing search over HTTP with Ray Serve, with model chaining and a review page.",
    ),
    "split": Stage(
        "mltag.stages.folds:SplitConfig",
        "mltag.stages.folds:run",
        "Assign every listing a stratified cross-validation fold (a `fold` column).",
    ),
    "oof": Stage(
        "mltag.stages.oof:OofConfig",
        "mltag.stages.oof:run",
        "Out-of-fold scores: one training run per fold, each scoring its held-out fold.",
    ),
    "curate": Stage(
        "mltag.stages.curate:CurateConfig",
        "mltag.stages.curate:run",
        "Curate a labelled catalog: pseudo-labels, tag pruning and merging, a label-issue review queue.",
    ),
    "train-head": Stage(
        "mltag.stages.train_head:TrainHeadConfig",
        "mltag.stages.train_head:run",
        "Fit a head for new tags on the embeddings stored in a tag table (no image is read).",
    ),
    "apply-head": Stage(
        "mltag.stages.apply_head:ApplyHeadConfig",
        "mltag.stages.apply_head:run",
        "Add a fitted head's scores and tags to every row of a tag table (one new table version).",
    ),
    "demo": Stage(
        "mltag.stages.demo:DemoConfig",
        "mltag.stages.demo:run",
        "Run sample -> train -> tag -> index -> search end to end on a local Ray instance.",
    ),
}


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``stage`` (the one being run) gets its config's arguments, which imports its module."""
    parser = argparse.ArgumentParser(prog="mltag", description="Tag, embed and search very large image catalogs on Ray.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, entry in STAGES.items():
        parser_of_stage = sub.add_parser(name, help=entry.help, description=entry.help)
        if name == stage:
            add_config_arguments(parser_of_stage, _resolve(entry.config))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(stage if stage in STAGES else None).parse_args(argv)
    from mltag.runtime import log

    log.configure()
    config_cls, run = STAGES[args.stage].load()
    try:
        config = config_from_args(config_cls, args)
    except (ConfigError, ValueError) as exc:
        print(f"mltag {args.stage}: {exc}", file=sys.stderr)
        return 2
    return run_stage(f"mltag {args.stage}", run, config)


def run_stage(prog: str, run: Callable, config) -> int:
    """Runs a stage as a command does (``mltag`` and the ``jobs/`` scripts): an input to fix, or a
    job-level failure with a message a person can act on, is one line on stderr and an exit code
    (2 and 1), not a traceback that buries it."""
    from mltag.errors import InputError
    from mltag.stages.tag import ErrorGateError
    from mltag.table.delta_table import TableConflictError, TableNotFoundError

    try:
        run(config)
    except InputError as exc:  # a manifest, vocabulary, model or URI to fix: like a bad flag
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except (ErrorGateError, TableConflictError, TableNotFoundError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
