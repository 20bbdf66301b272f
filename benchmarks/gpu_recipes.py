"""The `gpu` preset's recipe on one GPU: ccp-fashion quality and the preset's speed, with mltag's own
training loop and no Ray.

Why no Ray: the GPU machine this project is sometimes lent has no network and no Ray, and what
can be carried to it (64 MiB a call) is less than Ray's wheel. So this script runs on one GPU
what a Ray Train worker runs (``mltag.tagger.train_loop``: ``new_state``, ``train_one_epoch``,
``validate``; LP-FT's probe from ``mltag.tagger.linear_probe.fit_probe``; the config through
``TrainConfig`` and its presets, as the CLI parses it), minus Ray Data's ingest (an in-memory
shard of decoded images, fully reshuffled each epoch, stands for the streamed dataset) and DDP
(one GPU). The best validation epoch is kept and the probe wins when it scores higher on val,
as `mltag train` exports; test is scored as `mltag eval` scores it (macro and micro mAP over
the vocabulary's tags, the rare tags' mean AP beside benchmarks/probe_baseline.py's list).

ResNeXt-50's ImageNet weights cannot reach that machine (timm's hub needs the network, and the
file is larger than a call may carry), so the quality rows swap the preset's backbone for the
one whose weights travel, EfficientNet-Lite0: they measure recipes (the first gpu preset's
schedule and the cpu recipe, one change at a time), not ResNeXt-50's accuracy. The speed rows use ResNeXt-50 itself (random
weights time the same).

    # here (CPU): ccp-fashion decoded at 224 px as mltag decodes it, re-encoded as JPEG (q90), and
    # Lite0's converted weights, into a folder the device tool carries
    python benchmarks/gpu_recipes.py pack --out .gpu
    # on the GPU machine (the device tool: carry .gpu)
    python benchmarks/gpu_recipes.py run --bundle .gpu --out $OUT
    # here: the RESULTS.md section from what came back
    python benchmarks/gpu_recipes.py table --results $OUT/gpu_recipes.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

DATA = os.path.join(os.path.dirname(HERE), "..", "shared", "data", "ccp-fashion")
IMG_SIZE = 224
JPEG_QUALITY = 90
DECODE_SAMPLE = 64  # original photos carried for the on-device (nvJPEG) decode row
LITE0 = ["--backbone", "efficientnet_lite0"]
# the first gpu preset, spelled out (the preset has since become the cpu recipe on ResNeXt-50, from
# these rows): 20 epochs, batch 64, the backbone at 0.1 of the rate, EMA 0.999, batch-norm
# statistics updated, crops >= 70%, jitter 0.2, warmup 0.5 epochs
GPU_V1 = {
    **{"--backbone": "efficientnet_lite0", "--epochs": "20", "--batch-size": "64", "--backbone-lr-scale": "0.1"},
    **{"--ema-decay": "0.999", "--batch-norm": "train", "--crop-scale": "0.7", "--jitter": "0.2", "--warmup-epochs": "0.5"},
}


def gpu_v1(**changes: str) -> list[str]:
    """The first gpu preset's flags with ``changes`` in place (``ema_decay="0"``: --ema-decay 0)."""
    from recipe_screen import spelled

    return spelled(GPU_V1, changes, preset="gpu")


GPU = gpu_v1()
V5_224 = ["--preset", "cpu", "--img-size", "224", "--crop-scale", "0.7", "--jitter", "0.2"]

# label -> `mltag train` flags (the weights file is added). In the order they run: a call that
# runs out of time keeps the rows it finished.
VARIANTS = {
    # the first gpu preset with Lite0 for ResNeXt-50, 3 seeds
    "gpu-v1/lite0": GPU,
    # the screen's fifth cpu preset (crops >= 70%, jitter 0.2) at 224 px
    "v5/224px": V5_224,
    # one change at a time from that preset
    "gpu-v1/lite0/no-ema": gpu_v1(ema_decay="0"),
    "gpu-v1/lite0/backbone-lr-1": gpu_v1(backbone_lr_scale="1.0"),
    "gpu-v1/lite0/frozen-bn": gpu_v1(batch_norm="frozen"),
    "gpu-v1/lite0/light-aug": gpu_v1(crop_scale="0.9", jitter="0.1"),
    "gpu-v1/lite0/seed-1": gpu_v1(seed="1"),
    "gpu-v1/lite0/seed-2": gpu_v1(seed="2"),
    "v5/224px/seed-1": [*V5_224, "--seed", "1"],
    "v5/224px/seed-2": [*V5_224, "--seed", "2"],
    # today's cpu preset at 224 px: the recipe the gpu preset's schedule is up against
    "cpu/224px": ["--preset", "cpu", "--img-size", "224"],
    "gpu-v1/lite0/8-epochs": gpu_v1(epochs="8"),
    "cpu/224px/seed-1": ["--preset", "cpu", "--img-size", "224", "--seed", "1"],
    "cpu/224px/seed-2": ["--preset", "cpu", "--img-size", "224", "--seed", "2"],
    "gpu-v1/lite0/asl": gpu_v1(loss="asl"),  # the paper's gamma-=4, gamma+=0, clip 0.05
    # the cpu recipe (which won above) with the gpu preset's extras, one at a time
    "cpu/224px/20-epochs": ["--preset", "cpu", "--img-size", "224", "--epochs", "20"],
    "cpu/224px/batch-64": ["--preset", "cpu", "--img-size", "224", "--batch-size", "64"],
    "cpu/224px/ema": ["--preset", "cpu", "--img-size", "224", "--epochs", "20", "--ema-decay", "0.999"],
    "cpu/224px/batch-64/lr-2e-3": ["--preset", "cpu", "--img-size", "224", "--batch-size", "64", "--lr", "2e-3"],
}
SEEDED = ("gpu-v1/lite0", "v5/224px", "cpu/224px")


# ---- pack (here) ----------------------------------------------------------------------------------
def pack(out: str, data: str = DATA) -> None:
    """ccp-fashion's photos decoded at IMG_SIZE as `mltag train` decodes them, as JPEG, in one
    Parquet file with the manifest's columns; the vocabulary; Lite0's timm-format weights; a few
    original photos for the device-decode row."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from mltag.data.catalog import read_manifest
    from mltag.data.images import decode_image
    from mltag.tagger.weights import convert_efficientnet_lite0

    os.makedirs(out, exist_ok=True)
    manifest = read_manifest(os.path.join(data, "manifest.csv"), require_tags=True)
    jpegs, originals = [], []
    for i, uri in enumerate(manifest.column("image_uri").to_pylist()):
        raw = open(uri, "rb").read()
        buf = io.BytesIO()
        Image.fromarray(decode_image(raw, IMG_SIZE)).save(buf, "JPEG", quality=JPEG_QUALITY)
        jpegs.append(buf.getvalue())
        if i < DECODE_SAMPLE:
            originals.append(raw)
    table = pa.table(
        {
            "listing_id": manifest.column("listing_id"),
            "tags": manifest.column("tags"),
            "split": manifest.column("split"),
            "jpeg": pa.array(jpegs, pa.binary()),
        }
    )
    pq.write_table(table, os.path.join(out, "ccp224.parquet"), compression="none")
    pq.write_table(pa.table({"image_bytes": pa.array(originals, pa.binary())}), os.path.join(out, "originals.parquet"))
    shutil.copy(os.path.join(data, "vocabulary.yaml"), os.path.join(out, "vocabulary.yaml"))
    shutil.copy(convert_efficientnet_lite0(), os.path.join(out, "efficientnet_lite0-timm.pth"))
    shutil.copy(os.path.join(HERE, "results", "train_quality_baseline.json"), os.path.join(out, "baseline.json"))
    sizes = {name: os.path.getsize(os.path.join(out, name)) / 2**20 for name in os.listdir(out)}
    print(" ".join(f"{k} {v:.1f} MiB" for k, v in sizes.items()), f"total {sum(sizes.values()):.1f} MiB")


# ---- run (the GPU machine) ------------------------------------------------------------------------
class TableShard:
    """What the loop reads of Ray Train's dataset shard (``iter_batches``), over an in-memory
    Arrow table: a full reshuffle per epoch where Ray Data shuffles blocks and a local buffer.
    The loop's ``local_shuffle_seed`` is seed + epoch, so the order also mixes in the run's
    ``seed`` (as Ray Data's block order does): seed 1's epoch 0 must not be seed 0's epoch 1."""

    def __init__(self, table, seed: int = 0):
        self.table, self.seed = table, seed

    def iter_batches(self, batch_size, batch_format="pyarrow", local_shuffle_buffer_size=None, local_shuffle_seed=None, prefetch_batches=0):
        import pyarrow as pa

        n = self.table.num_rows
        order = np.random.default_rng([self.seed, local_shuffle_seed]).permutation(n) if local_shuffle_buffer_size else np.arange(n)
        for start in range(0, n, batch_size):
            yield self.table.take(pa.array(order[start : start + batch_size]))


def load_bundle(bundle: str, size: int = IMG_SIZE, limit: int = 0):
    """(rows per split with decoded ``pixels``, vocabulary, rare tag names); ``limit``: the first
    rows only (smoke runs)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from PIL import Image

    from mltag.data.images import pixels_to_arrow
    from mltag.data.vocabulary import Vocabulary

    table = pq.read_table(os.path.join(bundle, "ccp224.parquet"))
    table = table.slice(0, limit) if limit else table
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table.column("jpeg").to_pylist()])
    assert pixels.shape[1:] == (size, size, 3), pixels.shape
    table = table.drop_columns(["jpeg"]).append_column("pixels", pixels_to_arrow(pixels))
    table = table.append_column("image_uri", table.column("listing_id"))
    splits = {s: table.filter(pc.equal(table.column("split"), s)) for s in ("train", "val", "test")}
    vocab = Vocabulary.load(os.path.join(bundle, "vocabulary.yaml"))
    rare = json.load(open(os.path.join(bundle, "baseline.json")))["rare_tags"]
    return splits, vocab, rare


def parse_train_config(flags: list[str], bundle: str):
    """The TrainConfig the CLI would build from ``flags``, with Lite0's carried weights unless
    the flags name others."""
    from mltag.config import parse_config
    from mltag.stages.train import TrainConfig

    weights = [] if "--pretrained" in flags else ["--pretrained", os.path.join(bundle, "efficientnet_lite0-timm.pth")]
    return parse_config(TrainConfig, ["--manifest", "ccp-fashion", *flags, *weights])


def outputs_of(model, table, img_size: int, mean, std, device, bf16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores and pooled embeddings of every row, in row order: in float32 as ``validate``
    scores, or (``bf16``) as the tagging actor embeds on a GPU."""
    import torch

    from mltag.data.images import pixels_from_arrow
    from mltag.tagger.model import normalise

    scores, embeddings = [], []
    model.eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
        for start in range(0, table.num_rows, 128):
            pixels = torch.from_numpy(pixels_from_arrow(table.column("pixels").slice(start, 128), img_size).copy()).to(device)
            logits, emb = model(normalise(pixels, mean, std))
            scores.append(torch.sigmoid(logits.float()).cpu().numpy())
            embeddings.append(emb.float().cpu().numpy())
    return np.concatenate(scores), np.concatenate(embeddings)


def figures(vocab, table, scores, rare: list[str]) -> dict:
    from probe_baseline import split_figures

    y = vocab.encode(table.column("tags").to_pylist())
    names = list(vocab.names)
    rare_mask = np.isin(np.array(names), rare)
    f = split_figures(y, scores, rare_mask)
    f["rare_ap"] = {t: float(f["per_tag_ap"][names.index(t)]) for t in rare if t in names}
    del f["per_tag_ap"]
    return f


def fit_probe_start(config, vocab, splits, device, work: str) -> dict:
    """LP-FT's phase 1 as `mltag train` runs it (train.fit_probe_head), on the GPU: the frozen
    backbone's embeddings of train and val, ``fit_probe``, the probe's head on the backbone,
    saved as the model fine-tuning starts from."""
    from mltag.stages.train import start_model
    from mltag.tagger.linear_probe import fit_probe
    from mltag.tagger.model import save_tagger

    started = time.time()
    model, spec = start_model(config, vocab)
    model = model.to(device)
    x = {s: outputs_of(model, splits[s], config.img_size, spec.mean, spec.std, device, bf16=True)[1] for s in ("train", "val")}
    y = {s: vocab.encode(splits[s].column("tags").to_pylist()) for s in ("train", "val")}
    embedded = time.time() - started
    fit = fit_probe(x["train"], y["train"], x["val"], y["val"])
    model.set_head(fit.head.weight, fit.head.bias)
    best = int(np.nanargmax(fit.val_map))
    model_dir = os.path.join(work, f"probe-{config.backbone}-{config.img_size}-{config.pooling}")
    save_tagger(model.cpu(), spec, model_dir)
    return {
        "model": model_dir,
        "val_map": float(fit.val_map[best]),
        "l2": fit.l2,
        "embed_s": embedded,
        "fit_s": time.time() - started - embedded,
    }


def train_variant(flags: list[str], bundle: str, splits, vocab, rare, probes: dict, work: str) -> dict:
    """One `mltag train` recipe on one GPU, then its test figures."""
    import torch

    from mltag.stages.train import label_counts, labelled_table, loop_config, probe_wins
    from mltag.tagger.model import load_tagger
    from mltag.tagger.train_loop import Worker, freeze_backbone, new_state, train_one_epoch, validate

    config = parse_train_config(flags, bundle)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    key = (config.backbone, config.img_size, config.pooling)
    if config.head_init == "probe" and key not in probes:
        probes[key] = fit_probe_start(config, vocab, splits, device, work)
    probe = probes.get(key) if config.head_init == "probe" else None
    counts = label_counts(splits["train"], vocab)
    train = labelled_table(splits["train"], vocab, config.repeat_threshold, config.repeat_sqrt, counts=counts)
    train = train.append_column("pixels", splits["train"].column("pixels"))
    loop = loop_config(config, vocab, counts, float(train.column("repeat_factor").to_numpy().sum()), probe["model"] if probe else "")
    loop.progress = "off"
    torch.manual_seed(loop.seed)
    random.seed(loop.seed)
    np.random.seed(loop.seed)
    started = time.time()
    state = new_state(loop, device, 1)
    worker = Worker.build(loop, 0, 1, device)
    shard, val_shard = TableShard(train, loop.seed), TableShard(splits["val"])
    history, best_val, best_state, phase = [], -1.0, None, None
    for epoch in range(loop.epochs):
        head_only = epoch < loop.head_epochs
        if phase != head_only:
            freeze_backbone(state.model, head_only, loop.frozen_stages)
            phase = head_only
        m = train_one_epoch(worker, state.model, state, shard, epoch)
        m.update(validate(state.scored_model, val_shard, loop, device, worker.tag_index))
        history.append({k: m[k] for k in ("epoch", "train_loss", "val_map", "samples_per_s", "train_s")})
        if m["val_map"] > best_val:  # Ray Train keeps the best checkpoint by val_map; the export takes it
            best_val, best_state = m["val_map"], {k: v.detach().to("cpu", copy=True) for k, v in state.scored_model.state_dict().items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - started
    if probe and probe_wins(probe["val_map"], best_val):
        model, _ = load_tagger(probe["model"], device)
        kept = "probe"
    else:
        state.scored_model.load_state_dict(best_state)
        model = state.scored_model
        kept = "fine-tuned"
    test = figures(vocab, splits["test"], outputs_of(model, splits["test"], loop.img_size, loop.mean, loop.std, device)[0], rare)
    return {
        "flags": flags,
        "val_map": probe["val_map"] if kept == "probe" else best_val,
        "fine_tuned_val_map": best_val if kept == "probe" else None,
        "probe_val_map": probe["val_map"] if probe else None,
        "train_s": train_s,
        "history": history,
        **test,
    }


# the first gpu preset's step (batch 64, EMA) on its own backbone, timed: random weights (speed does
# not depend on them), 2 epochs
SPEED = {
    "resnext50_32x4d": gpu_v1(backbone="resnext50_32x4d", pretrained="none", head_init="random", epochs="2"),
    "efficientnet_lite0": gpu_v1(pretrained="none", head_init="random", epochs="2"),
}


def tagging_speed(model_dir: str, splits, originals, repeats: int = 8) -> dict:
    """Images/s through the tagging actor (TaggerActor: bf16, channels-last; scores, tags and
    embeddings back on the host as tag-table rows) on decoded pixels (decode_on cpu) and on the
    original JPEG bytes (decode_on actor: nvJPEG and the resize on the GPU)."""
    import pyarrow as pa
    import torch

    from mltag.tagging.actor import TaggerActor

    actor = TaggerActor(model_dir, use_gpu=torch.cuda.is_available(), threads=4, threshold=0.5)
    pixels = splits["train"].slice(0, 256)
    n = pixels.num_rows
    batches = {
        f"pixels (decode_on cpu), batch {n}": pa.table(
            {
                "listing_id": pixels.column("listing_id"),
                "image_uri": pixels.column("image_uri"),
                "error": pa.nulls(n, pa.string()),
                "pixels": pixels.column("pixels"),
            }
        ),
        f"JPEG bytes (decode_on actor, nvJPEG), batch {originals.num_rows}": pa.table(
            {
                "listing_id": [str(i) for i in range(originals.num_rows)],
                "image_uri": [str(i) for i in range(originals.num_rows)],
                "error": pa.nulls(originals.num_rows, pa.string()),
                "image_bytes": originals.column("image_bytes"),
            }
        ),
    }
    out = {}
    for name, batch in batches.items():
        rows = actor(batch)  # warm-up (cuDNN's algorithm choice, nvJPEG's handles)
        assert rows.num_rows == batch.num_rows and all(e is None for e in rows.column("error").to_pylist())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.time()
        for _ in range(repeats):
            actor(batch)
        out[name] = batch.num_rows * repeats / (time.time() - started)
    return out


def run(bundle: str, out: str, variants: list[str], speed: bool = True, smoke: bool = False) -> dict:
    """Every row, saved after each one: a call that runs out of time keeps the rows it finished.
    ``smoke``: 160 photos, one epoch, two tagging repeats (checks the script end to end on a CPU)."""
    import pyarrow.parquet as pq
    import torch

    from mltag.runtime import log
    from mltag.tagger.model import save_tagger

    log.configure()
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="mltag-gpu-recipes-")  # the probe's and the speed rows' models
    started = time.time()
    splits, vocab, rare = load_bundle(bundle, limit=160 if smoke else 0)
    more = ["--epochs", "1"] if smoke else []
    print(f"bundle loaded in {time.time() - started:.1f} s: " + ", ".join(f"{k} {v.num_rows}" for k, v in splits.items()), flush=True)
    results = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "rows": {},
        "speed": {},
        "errors": {},
    }
    path = os.path.join(out, "gpu_recipes.json")

    def save():
        with open(path, "w") as f:
            json.dump(results, f, indent=2, default=float)

    if speed:
        for backbone, flags in SPEED.items():
            try:
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                row = train_variant([*flags, *more], bundle, splits, vocab, rare, {}, work)
                results["speed"][f"train {backbone}"] = row["history"][-1]["samples_per_s"]
                if torch.cuda.is_available():
                    results.setdefault("peak_gib", {})[f"train {backbone}"] = torch.cuda.max_memory_allocated() / 2**30
                print(f"speed: train {backbone} {row['history'][-1]['samples_per_s']:.0f} samples/s", flush=True)
            except Exception:  # a failed row is reported, the others still run
                results["errors"][f"speed/{backbone}"] = traceback.format_exc()
                print(traceback.format_exc(), flush=True)
            save()
        try:
            from mltag.stages.train import start_model

            config = parse_train_config(SPEED["resnext50_32x4d"], bundle)
            model, spec = start_model(config, vocab)
            model_dir = os.path.join(work, "resnext50-random")
            save_tagger(model, spec, model_dir)
            for name, rate in tagging_speed(
                model_dir, splits, pq.read_table(os.path.join(bundle, "originals.parquet")), 2 if smoke else 8
            ).items():
                results["speed"][f"tag resnext50_32x4d, {name}"] = rate
                print(f"speed: tag resnext50_32x4d, {name}: {rate:.0f} images/s", flush=True)
        except Exception:
            results["errors"]["speed/tag"] = traceback.format_exc()
            print(traceback.format_exc(), flush=True)
        save()
    probes: dict = {}
    for label in variants:
        try:
            row = train_variant([*VARIANTS[label], *more], bundle, splits, vocab, rare, probes, work)
        except Exception:
            results["errors"][label] = traceback.format_exc()
            print(traceback.format_exc(), flush=True)
            continue
        results["rows"][label] = row
        results["probes"] = {"/".join(map(str, k)): {kk: vv for kk, vv in p.items() if kk != "model"} for k, p in probes.items()}
        save()
        print(
            f"{label:<28} val {row['val_map']:.4f} test {row['macro_map']:.4f} micro {row['micro_map']:.4f} "
            f"rare {row['rare_map']:.4f}  {row['train_s']:.0f} s  [{time.time() - started:.0f} s so far]",
            flush=True,
        )
    return results


# ---- table (here) ---------------------------------------------------------------------------------
def table(results_path: str) -> None:
    from recipe_screen import _baseline_rows
    from results import save

    r = json.load(open(results_path))
    rows = r["rows"]
    lines = [
        "| recipe (flags, with Lite0's weights) | val macro mAP | test macro mAP | test micro mAP | rare-tag mean AP | training (s, 1 GPU) |",
        "|---|---|---|---|---|---|",
    ]
    for label, b in _baseline_rows().items():
        lines.append(f"| baseline: {label} | | {b['macro_map']:.4f} | {b['micro_map']:.4f} | {b['rare_map']:.4f} | (features only) |")
    families = ("gpu-v1/", "v5/", "cpu/")  # the first gpu preset's rows, then the cpu recipes'
    ordered = sorted(rows, key=lambda k: (next(i for i, f in enumerate(families + ("",)) if k.startswith(f)), list(VARIANTS).index(k)))
    for label in ordered:
        row = rows[label]
        val = f"{row['val_map']:.4f}"
        if row.get("fine_tuned_val_map") is not None:
            val = f"fine-tuned {row['fine_tuned_val_map']:.4f} < probe {val}: probe kept"
        flags = " ".join(row["flags"])
        lines.append(
            f"| `{flags}` ({label}) | {val} | {row['macro_map']:.4f} | {row['micro_map']:.4f} | {row['rare_map']:.4f} | {row['train_s']:.0f} |"
        )
    seeded = []
    for base in SEEDED:
        runs = [rows[k] for k in (base, f"{base}/seed-1", f"{base}/seed-2") if k in rows]
        if len(runs) > 1:
            cells = {
                k: f"{np.mean([x[k] for x in runs]):.4f} ± {np.std([x[k] for x in runs]):.4f}" for k in ("val_map", "macro_map", "rare_map")
            }
            seeded.append(
                f"`{base}` over {len(runs)} seeds (mean ± sd): val macro mAP {cells['val_map']}, test {cells['macro_map']}, rare tags {cells['rare_map']}."
            )
    peak = r.get("peak_gib", {})
    speed = ["| what | rate | peak GPU memory |", "|---|---|---|"] + [
        f"| {k} | {v:,.0f} {'samples' if k.startswith('train') else 'images'}/s | {f'{peak[k]:.1f} GiB' if k in peak else ''} |"
        for k, v in r.get("speed", {}).items()
    ]
    probes = "; ".join(
        f"{k}: val {p['val_map']:.4f} (L2 {p['l2']:g}), embedding {p['embed_s']:.0f} s, fit {p['fit_s']:.0f} s"
        for k, p in r.get("probes", {}).items()
    )
    md = (
        "No Ray on that machine (benchmarks/gpu_recipes.py says why): mltag's own training loop, one process, on ccp-fashion "
        "decoded at 224 px (re-encoded as JPEG q90 to travel), each row's best validation epoch kept (or the probe, when it "
        "scores higher on val) and judged on the test split as the 2-core screen is. ResNeXt-50's ImageNet weights cannot "
        "reach that machine, so the recipe rows run on EfficientNet-Lite0's; `gpu-v1/` rows spell out the first `gpu` "
        "preset. `python benchmarks/gpu_recipes.py run` (about 10 minutes there, 2 of them the probe's fit on the CPU), "
        f"{r.get('runs', 'one call')}.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "\n\n".join(seeded)
        + (f"\n\nLP-FT's probe (fitted once a call, shared by the rows that start from it): {probes}." if probes else "")
        + "\n\nSpeed on that GPU, random weights (speed does not depend on them). Training: the first `gpu` preset's step "
        "(batch 64, bf16 autocast, augmentation on the GPU, AdamW, EMA) through `train_one_epoch` from memory (no decoding), "
        "the second of two epochs over the 1,462 training photos. Tagging: `TaggerActor` (bf16, channels-last; scores, tags "
        "and embeddings back on the host as tag-table rows) on ResNeXt-50 at 224 px, on decoded pixels and on the original "
        "JPEGs (550x825) decoded on the GPU.\n\n" + "\n".join(speed) + ("\n\nFailed: " + ", ".join(r["errors"]) if r.get("errors") else "")
    )
    machine = f"one {r['device']}, {r['cpus']} CPU cores; torch {r['torch']}"
    save("gpu_recipes", {"machine": machine, "date": r.get("date", time.strftime("%Y-%m-%d")), "results": r}, md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="here: the data and weights the GPU machine needs")
    p.add_argument("--out", default=".gpu")
    p.add_argument("--data", default=DATA)
    p = sub.add_parser("run", help="on the GPU machine: the recipes and the speed rows")
    p.add_argument("--bundle", default=".gpu")
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default="", help="comma-separated labels of VARIANTS (default: all, in order)")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--smoke", action="store_true", help="160 photos, one epoch: the script end to end, on a CPU too")
    p = sub.add_parser("table", help="here: the RESULTS.md section")
    p.add_argument("--results", required=True)
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.out, args.data)
    elif args.command == "run":
        run(args.bundle, args.out, args.variants.split(",") if args.variants else list(VARIANTS), speed=not args.no_speed, smoke=args.smoke)
    else:
        table(args.results)


if __name__ == "__main__":
    main()
