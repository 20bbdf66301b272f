"""``mltag report``: one HTML page with PNG figures for people deciding whether a tagger is good.

Figures: training and validation curves, precision-recall curves of the worst and best tags,
per-tag AP, the L1 confusion matrix; and the metrics table. Inputs are a tagger directory (its
training history) and an ``mltag eval`` output directory.

Tag names come from a vocabulary file, which is data: every one of them is HTML-escaped in the
page, and shown literally (no mathtext) in the figures.

Example:
    mltag report --model runs/train/model --eval runs/eval --out runs/report
"""

from __future__ import annotations

import html
import json
import logging
import os
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from mltag.maths.metrics import precision_recall_curve
from mltag.table.tag_table import list_matrix
from mltag.tagger.spec import load_spec

logger = logging.getLogger(__name__)

FIGURES = ("training_curves.png", "pr_curves.png", "per_tag_ap.png", "confusion_l1.png")


@dataclass
class ReportConfig:
    """Write an HTML report (PNG figures + metrics table) for a trained and evaluated tagger."""

    model: str = ""  # tagger directory (training history)
    eval: str = ""  # `mltag eval` output directory
    out: str = "runs/report"  # report directory (report.html + PNGs)
    curves: int = 3  # how many worst and best tags get PR curves
    baseline_eval: str = (
        ""  # another `mltag eval` directory on the same split (e.g. of <train out>/probe/model): its AP per tag beside this one's
    )
    rare_below: int = 60  # the rarest tags: fewer training images than this (the model records its training counts)

    def validate(self) -> None:
        if not self.model or not self.eval:
            raise ValueError("model and eval are required")


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _literal(text: str) -> str:
    """A label matplotlib draws as written: an unescaped '$' would start mathtext (and a
    malformed formula in a tag name would fail the whole report)."""
    return str(text).replace("$", r"\$")


def plot_training_curves(history: list[dict], path: str) -> None:
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o")
    left.set(title="training loss", xlabel="epoch", ylabel="loss")
    right.plot(epochs, [h["val_map"] for h in history], marker="o", label="val mAP (macro)")
    right.plot(epochs, [h.get("val_map_micro") for h in history], marker="s", label="val mAP (micro)")
    if history and history[0].get("val_chance_map") is not None:
        right.axhline(history[0]["val_chance_map"], color="grey", linestyle="--", label="chance")
    right.set(title="validation", xlabel="epoch", ylabel="mAP", ylim=(0, 1.02))
    right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pr_curves(labels: np.ndarray, scores: np.ndarray, per_tag, count: int, path: str) -> list[str]:
    plt = _plt()
    rows = [r for r in per_tag.to_pylist() if r["support"] > 0 and not np.isnan(r["ap"])]
    rows.sort(key=lambda r: r["ap"])
    picked = rows[:count] + [r for r in rows[-count:] if r not in rows[:count]]
    index = {r["tag"]: i for i, r in enumerate(per_tag.to_pylist())}
    fig, ax = plt.subplots(figsize=(6, 5))
    for r in picked:
        j = index[r["tag"]]
        precision, recall, _ = precision_recall_curve(labels[:, j], scores[:, j])
        ax.step(np.r_[0, recall], np.r_[precision[0], precision], where="pre", label=f"{_literal(r['tag'])} (AP {r['ap']:.2f})")
    ax.set(title=f"precision-recall: {count} worst and best tags", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [r["tag"] for r in picked]


def plot_per_tag_ap(per_tag, path: str) -> None:
    plt = _plt()
    rows = sorted((r for r in per_tag.to_pylist() if not np.isnan(r["ap"])), key=lambda r: r["ap"])
    fig, ax = plt.subplots(figsize=(7, max(3, 0.25 * len(rows) + 1)))
    ax.barh([_literal(r["tag"]) for r in rows], [r["ap"] for r in rows], color="tab:blue")
    ax.set(title="average precision per tag", xlabel="AP", xlim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: np.ndarray, classes: list[str], path: str) -> None:
    plt = _plt()
    side = max(4.5, 1.5 + 0.6 * len(classes))
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(confusion, cmap="Blues")
    labels = [_literal(c) for c in classes]
    ax.set_xticks(range(len(classes)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), labels)
    for (i, j), v in np.ndenumerate(confusion):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > confusion.max() / 2 else "black", fontsize=8)
    ax.set_title("L1 confusion: true class vs top-1 prediction", fontsize=10)
    ax.set(xlabel="predicted (top-1)", ylabel="true")
    with warnings.catch_warnings():
        # Very long class names cannot fit any margin: the figure is still drawn, labels clipped.
        warnings.filterwarnings("ignore", message="Tight layout not applied", category=UserWarning)
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows) + "</table>"


def rare_tag_rows(per_tag: list[dict], train_counts: dict[str, int], rare_below: int, baseline: dict[str, float] | None) -> list[dict]:
    """The tags with fewer than ``rare_below`` training images (rarest first) that the evaluated
    split holds, with this model's AP and the baseline's (pure)."""
    rows = [
        {
            "tag": r["tag"],
            "train": train_counts[r["tag"]],
            "support": r["support"],
            "ap": r["ap"],
            "baseline_ap": (baseline or {}).get(r["tag"]),
        }
        for r in per_tag
        if r["tag"] in train_counts and train_counts[r["tag"]] < rare_below and r["support"] > 0
    ]
    return sorted(rows, key=lambda r: (r["train"], r["tag"]))


def _rare_section(rows: list[dict], rare_below: int, baseline: bool, recorded: bool) -> str:
    title = f"<h2>Rarest tags (fewer than {rare_below} training images)</h2>"
    if not recorded:
        return title + "<p>This model records no training counts per tag (trained before mltag 0.1's export recorded them).</p>"
    if not rows:
        return title + "<p>None in the evaluated split.</p>"
    mean = lambda key: float(np.nanmean([r[key] for r in rows if r[key] is not None]))  # noqa: E731
    head = "<tr><th>tag</th><th>training images</th><th>support</th><th>AP</th>" + ("<th>baseline AP</th>" if baseline else "") + "</tr>"
    body = "".join(
        f"<tr><td>{html.escape(r['tag'])}</td><td>{r['train']}</td><td>{r['support']}</td><td>{r['ap']:.3f}</td>"
        + (f"<td>{r['baseline_ap']:.3f}</td>" if baseline and r["baseline_ap"] is not None else "<td></td>" if baseline else "")
        + "</tr>"
        for r in rows
    )
    total = (
        f"<tr><th>mean</th><td></td><td></td><td>{mean('ap'):.3f}</td>"
        + (f"<td>{mean('baseline_ap'):.3f}</td>" if baseline else "")
        + "</tr>"
    )
    return f'{title}<table id="rare-tags">{head}{body}{total}</table>'


def run(config: ReportConfig) -> str:
    spec = load_spec(config.model)
    with open(os.path.join(config.eval, "metrics.json")) as f:
        metrics = json.load(f)
    per_tag = pq.read_table(os.path.join(config.eval, "per_tag.parquet"))
    scores_table = pq.read_table(os.path.join(config.eval, "scores.parquet"))
    n = len(spec.vocab)
    labels = list_matrix(scores_table.column("labels"), dtype=None, width=n)
    scores = list_matrix(scores_table.column("scores"), dtype=None, width=n)
    os.makedirs(config.out, exist_ok=True)

    plot_training_curves(spec.extra.get("history", []), os.path.join(config.out, FIGURES[0]))
    plot_pr_curves(labels, scores, per_tag, config.curves, os.path.join(config.out, FIGURES[1]))
    plot_per_tag_ap(per_tag, os.path.join(config.out, FIGURES[2]))
    train_counts = spec.extra.get("train_tag_counts") or {}
    baseline = None
    if config.baseline_eval:
        base = pq.read_table(os.path.join(config.baseline_eval, "per_tag.parquet"))
        baseline = dict(zip(base.column("tag").to_pylist(), base.column("ap").to_pylist()))
    rare = rare_tag_rows(per_tag.to_pylist(), train_counts, config.rare_below, baseline)
    l1 = metrics["levels"]["L1"]
    plot_confusion(np.asarray(l1["confusion"]), l1["classes"], os.path.join(config.out, FIGURES[3]))

    summary = [
        ("model version", spec.version),
        ("backbone", spec.backbone),
        ("images evaluated", str(metrics["images"])),
        ("mAP (macro)", f"{metrics['map_macro']:.4f}"),
        ("mAP (micro)", f"{metrics['map_micro']:.4f}"),
        ("Hamming loss", f"{metrics['hamming_loss']:.4f}"),
        (
            "precision / recall / F1 (micro)",
            f"{metrics['micro_precision']:.3f} / {metrics['micro_recall']:.3f} / {metrics['micro_f1']:.3f}",
        ),
        (
            "top-1 / top-3 / top-5 accuracy",
            f"{metrics['top1_accuracy']:.3f} / {metrics['top3_accuracy']:.3f} / {metrics['top5_accuracy']:.3f}",
        ),
    ]
    summary += [
        (f"{lvl} accuracy (micro / macro)", f"{m['micro_accuracy']:.3f} / {m['macro_accuracy']:.3f}")
        for lvl, m in metrics["levels"].items()
    ]
    tag_rows = "".join(
        f"<tr><td>{html.escape(r['tag'])}</td><td>{r['level']}</td><td>{r['support']}</td><td>{r['ap']:.3f}</td>"
        f"<td>{r['threshold']:.3f}</td><td>{r['precision']:.3f}</td><td>{r['recall']:.3f}</td><td>{r['f1']:.3f}</td></tr>"
        for r in sorted(per_tag.to_pylist(), key=lambda r: np.nan_to_num(r["ap"], nan=-1))
    )
    figures = "".join(f'<figure><img src="{name}" alt="{name}"></figure>' for name in FIGURES)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mltag report {html.escape(spec.version)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #ccc;padding:3px 8px;text-align:left}} figure{{display:inline-block;margin:0.5em}} img{{max-width:100%}}</style>
</head><body>
<h1>mltag report: {html.escape(spec.backbone)} ({html.escape(spec.version)})</h1>
<h2>Metrics</h2>{_table(summary)}
<h2>Figures</h2>{figures}
{_rare_section(rare, config.rare_below, baseline is not None, bool(train_counts))}
<h2>Per tag (worst AP first)</h2>
<table><tr><th>tag</th><th>level</th><th>support</th><th>AP</th><th>threshold</th><th>precision</th><th>recall</th><th>F1</th></tr>{tag_rows}</table>
<script>
// Lets a headless browser (and a test) confirm every figure decoded.
window.addEventListener("load", () => {{
  const imgs = [...document.images];
  document.body.dataset.figures = imgs.length;
  document.body.dataset.figuresRendered = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
}});
</script>
</body></html>"""
    path = os.path.join(config.out, "report.html")
    with open(path, "w") as f:
        f.write(page)
    logger.info(f"report -> {path}")
    return path
