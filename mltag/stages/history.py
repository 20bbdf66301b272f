"""``mltag history``: the versions of a tag table, newest first, with what each run recorded.

    mltag history --table runs/tag_table
    mltag history --table s3://bucket/tag_table --limit 7

Each line is one commit: version, commit time, operation, snapshot label, run id, model version,
rows and error rows, and for nightly merges how many rows were new, changed, retried and deleted.
``--as-of VERSION|DATE`` on ``mltag index``, ``index-update`` and ``eval`` reads one of them.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

from mltag.table import delta_table


@dataclass
class HistoryConfig:
    """List a tag table's versions with each run's metadata."""

    table: str = "runs/tag_table"  # the Delta tag table (local or s3://)
    limit: int = 20  # newest versions shown; 0: all

    def validate(self) -> None:
        if self.limit < 0:
            raise ValueError("limit must be >= 0")


def rows(table: str, limit: int = 0) -> list[dict]:
    """One dict per version, newest first (what ``run`` prints)."""
    entries = delta_table.history_entries(delta_table.open_table(table))
    out = []
    for entry in entries[: limit or None]:
        meta = entry.get(delta_table.METADATA_KEY) or {}
        stamp = entry.get("timestamp")
        out.append(
            {
                "version": entry["version"],
                "operation": entry.get("operation"),
                "committed": _dt.datetime.fromtimestamp(stamp / 1000, _dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if stamp else "",
                "mltag": meta.get("operation"),
                "snapshot": meta.get("snapshot"),
                "run_id": meta.get("run_id"),
                "model_version": meta.get("model_version"),
                "rows": meta.get("rows"),
                "errors": meta.get("errors"),
                **{k: meta.get(k) for k in ("new", "changed", "retry", "deleted", "retried", "healed") if k in meta},
            }
        )
    return out


def run(config: HistoryConfig) -> list[dict]:
    versions = rows(config.table, config.limit)
    print(
        f"{'version':>7}  {'committed (UTC)':<19}  {'operation':<13}  {'snapshot':<10}  {'rows':>9}  {'errors':>7}  {'model':<12}  changes"
    )
    for v in versions:
        changes = ", ".join(f"{k} {v[k]}" for k in ("new", "changed", "retry", "deleted", "retried", "healed") if k in v)
        print(
            f"{v['version']:>7}  {v['committed']:<19}  {(v['mltag'] or v['operation'] or ''):<13}  {(v['snapshot'] or ''):<10}  "
            f"{'' if v['rows'] is None else v['rows']:>9}  {'' if v['errors'] is None else v['errors']:>7}  "
            f"{(v['model_version'] or '')[:12]:<12}  {changes}"
        )
    return versions
