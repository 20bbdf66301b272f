"""Tag a catalog with Ray Data: manifest -> bytes -> pixels (CPU tasks) -> tagger actors -> Parquet.

Launch:
    mltag tag --manifest catalog/manifest.parquet --model runs/train/model --out runs/tag_table
    ray job submit --working-dir . -- python jobs/tag_catalog.py --config configs/demo.yaml

Every manifest row becomes exactly one tag-table row (see ``mltag.tag_table``): images that
cannot be read or decoded become rows with an ``error`` value. The run is written to a staging
directory and swapped into place only when complete, then ``_SUCCESS.json`` is written last, so
a re-run replaces the previous table whole and a crashed run never looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mltag import catalog, storage, tag_table
from mltag.config import config_hash, save_config
from mltag.images import DEFAULT_MAX_PIXELS, decode_batch, fetch_batch, pixels_from_arrow
from mltag.model import load_spec, load_tagger, normalise, pick_device


@dataclass
class TagConfig:
    """Tag every image of a catalog manifest and write the Parquet tag table."""

    manifest: str = ""  # catalog manifest (Parquet/CSV, local or s3)
    model: str = ""  # trained tagger directory (weights.pt + tagger.json)
    out: str = "runs/tag_table"  # tag-table directory (local or s3); replaced whole on re-run
    snapshot: str = ""  # write the run under out/snapshot=VALUE (a hive partition, e.g. a date); empty: out itself
    run_id: str = ""  # recorded in _SUCCESS.json; empty: a fresh random id
    batch_size: int = 64  # images per inference call
    decode_batch_size: int = 32  # images per CPU decode task
    num_actors: int = 0  # inference actors; 0: one per GPU, or one per 2 CPUs on CPU-only clusters
    cpus_per_actor: int = 1  # CPUs reserved per inference actor
    torch_threads: int = 0  # intra-op threads per actor; 0: cpus_per_actor on GPU, the node's CPU share on CPU-only clusters
    use_gpu: str = "auto"  # auto | true | false
    threshold: float = -1.0  # one threshold for all tags; negative: the model's saved thresholds
    max_tags: int = 0  # keep at most this many tags per image (best scores first); 0: no limit
    embedding_dtype: str = "float32"  # float32 | float16 (half the bytes; cosine search barely changes)
    decode_on: str = "cpu"  # cpu: Pillow in CPU tasks | actor: JPEG decode on the actor's device (nvJPEG on GPU)
    compile: bool = False  # torch.compile the model in each actor (pays off on long GPU runs)
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused (decompression bombs)
    rows_per_file: int = 100_000  # minimum rows per Parquet file (avoids thousands of tiny files)

    def validate(self) -> None:
        if not self.manifest:
            raise ValueError("manifest is required (--manifest PATH)")
        if not self.model:
            raise ValueError("model is required (--model DIR, a trained tagger directory)")
        if self.use_gpu not in ("auto", "true", "false"):
            raise ValueError("use_gpu must be auto, true or false")
        if self.batch_size < 1 or self.decode_batch_size < 1:
            raise ValueError("batch sizes must be positive")
        if self.embedding_dtype not in tag_table.EMBEDDING_DTYPES:
            raise ValueError(f"embedding_dtype must be one of: {', '.join(tag_table.EMBEDDING_DTYPES)}")
        if self.decode_on not in ("cpu", "actor"):
            raise ValueError("decode_on must be cpu or actor")
        if self.snapshot and ("/" in self.snapshot or "=" in self.snapshot):
            raise ValueError("snapshot is a partition value such as 2026-11-23 (no '/' or '=')")

    def table_dir(self) -> str:
        out = self.out if storage.is_remote(self.out) else os.path.abspath(self.out)
        return storage.join(out, f"snapshot={self.snapshot}") if self.snapshot else out


class TaggerActor:
    """One inference worker of the pool: loads the model once, tags batches of images.

    Input rows carry either decoded ``pixels`` (decode_on=cpu) or raw ``image_bytes``
    (decode_on=actor, decoded here on the actor's device)."""

    def __init__(self, model_dir: str, use_gpu: bool, threads: int, threshold: float, max_tags: int = 0,
                 embedding_dtype: str = "float32", compile: bool = False):
        torch.set_num_threads(max(1, threads))
        self.device = pick_device("true" if use_gpu else "false")
        self.model, self.spec = load_tagger(model_dir, self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if compile else self.model
        vocab = self.spec.vocab
        self.names = list(vocab.names)
        self.ancestors = {n: vocab.ancestors(n) for n in vocab.names if vocab.ancestors(n)}
        self.thresholds = np.full(len(self.names), threshold, np.float32) if threshold >= 0 else self.spec.threshold_array()
        self.max_tags, self.embedding_dtype = max_tags, embedding_dtype

    def _pixels(self, batch: pa.Table, ok: np.ndarray, errors: list) -> tuple[torch.Tensor, np.ndarray]:
        if "pixels" in batch.column_names:
            pixels = pixels_from_arrow(batch.column("pixels"), self.spec.img_size)[ok]
            return torch.from_numpy(pixels).to(self.device, non_blocking=True), ok
        from mltag.device_decode import decode_on_device

        data = batch.column("image_bytes").take(pa.array(ok)).to_pylist()
        pixels, failures = decode_on_device(data, self.spec.img_size, self.device)
        for k, failure in failures.items():
            errors[ok[k]] = failure
        keep = np.array([k for k in range(len(ok)) if k not in failures], dtype=np.int64)
        return pixels[torch.from_numpy(keep).to(pixels.device)] if len(keep) < len(ok) else pixels, ok[keep]

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        errors = batch.column("error").to_pylist()
        ok = np.array([i for i, e in enumerate(errors) if e is None], dtype=np.int64)
        dim = self.model.embedding_dim
        scores = np.zeros((0, len(self.names)), np.float32)
        embeddings = np.zeros((0, dim), np.float32)
        if ok.size:
            pixels, ok = self._pixels(batch, ok, errors)
        if ok.size:
            x = normalise(pixels, self.spec.mean, self.spec.std)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                logits, emb = self.forward(x)
            scores = torch.sigmoid(logits.float()).cpu().numpy()
            embeddings = emb.float().cpu().numpy()
        tags = tag_table.decide_tags(scores, self.thresholds, self.names, self.ancestors, self.max_tags)
        return tag_table.assemble(batch, ok, scores, embeddings, tags, self.spec.version, errors, self.embedding_dtype)


def _resources(config: TagConfig) -> tuple[int, bool]:
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = (config.use_gpu == "true") or (config.use_gpu == "auto" and gpus > 0)
    if config.num_actors > 0:
        return config.num_actors, use_gpu
    if use_gpu:
        return max(1, gpus), True
    # Leave half the CPUs to the decode tasks that feed the actors.
    return max(1, int(resources.get("CPU", 1)) // (2 * config.cpus_per_actor)), False


def _torch_threads(config: TagConfig, num_actors: int, use_gpu: bool) -> int:
    """On CPU the forward pass is the bottleneck (decoding a listing photo is ~10x cheaper): each
    actor's threads get the whole CPU share of its actor, the decode tasks squeeze in between."""
    import ray

    if config.torch_threads > 0:
        return config.torch_threads
    if use_gpu:
        return config.cpus_per_actor
    return max(config.cpus_per_actor, int(ray.cluster_resources().get("CPU", 1)) // max(1, num_actors))


def build_pipeline(config: TagConfig, manifest: pa.Table):
    """The Ray Data chain: read -> fetch + decode (CPU tasks) -> tag (actor pool)."""
    import ray.data

    spec = load_spec(config.model)
    num_actors, use_gpu = _resources(config)
    threads = _torch_threads(config, num_actors, use_gpu)
    ds = ray.data.from_arrow(catalog.chunk_table(manifest, config.decode_batch_size))
    if config.decode_on == "actor":
        ds = ds.map_batches(fetch_batch, fn_kwargs={"max_pixels": config.max_pixels},
                            batch_format="pyarrow", batch_size=config.decode_batch_size, udf_modifying_row_count=False)
    else:
        ds = ds.map_batches(decode_batch, fn_kwargs={"size": spec.img_size, "max_pixels": config.max_pixels},
                            batch_format="pyarrow", batch_size=config.decode_batch_size, udf_modifying_row_count=False)
    return ds.map_batches(
        TaggerActor,
        fn_constructor_kwargs={"model_dir": config.model, "use_gpu": use_gpu, "threads": threads,
                               "threshold": config.threshold, "max_tags": config.max_tags,
                               "embedding_dtype": config.embedding_dtype, "compile": config.compile},
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=config.batch_size,
        batch_format="pyarrow",
        num_gpus=1 if use_gpu else 0,
        num_cpus=config.cpus_per_actor,
        udf_modifying_row_count=False,
    )


def _summarise(directory: str, files: list[str]) -> dict:
    """Counts straight from the written files: what readers will actually see."""
    fs, _ = storage.arrow_filesystem_for(directory)
    rows = errors = tagged = 0
    tag_counts: dict[str, int] = {}
    for f in files:
        _, path = storage.arrow_filesystem_for(storage.join(directory, f))
        table = pq.read_table(path, columns=["error", "tags"], filesystem=fs)
        rows += table.num_rows
        errors += table.num_rows - table.column("error").null_count
        flat = pc.list_flatten(table.column("tags"))
        tagged += len(flat)
        for value in pc.value_counts(flat).to_pylist():
            tag_counts[value["values"]] = tag_counts.get(value["values"], 0) + value["counts"]
    return {"rows": rows, "errors": errors, "tags_assigned": tagged, "tag_counts": dict(sorted(tag_counts.items()))}


def run(config: TagConfig) -> dict:
    """Runs the pipeline and commits the tag table; returns the ``_SUCCESS.json`` content."""
    import ray

    manifest = catalog.read_manifest(config.manifest)  # a bad manifest fails here, before any work
    spec = load_spec(config.model)
    if not ray.is_initialized():
        ray.init()
    run_id = config.run_id or time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    out = config.table_dir()
    started = time.time()

    # Local: write beside the target, then swap in. S3 has no rename: clear, write, mark.
    staging = out if storage.is_remote(out) else os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.staging-{run_id}")
    storage.remove_tree(staging)
    if storage.is_remote(out):
        storage.remove_tree(out)
    fs, path = storage.arrow_filesystem_for(staging)
    build_pipeline(config, manifest).write_parquet(path, filesystem=fs, min_rows_per_file=config.rows_per_file)

    ffs, fpath = storage.filesystem_for(staging)
    files = sorted(os.path.relpath(p, fpath) if not storage.is_remote(staging) else p[len(fpath) + 1:]
                   for p in ffs.find(fpath) if p.endswith(".parquet"))
    counts = _summarise(staging, files)
    if counts["rows"] != manifest.num_rows:  # the contract: rows out = rows in
        raise RuntimeError(f"tag table has {counts['rows']} rows for {manifest.num_rows} manifest rows; not committing")
    success = {
        "run_id": run_id, "snapshot": config.snapshot or None, "model_version": spec.version,
        "model": config.model if storage.is_remote(config.model) else os.path.abspath(config.model), "manifest": config.manifest,
        "config_hash": config_hash(config), "embedding_dim": spec.embedding_dim, "embedding_dtype": config.embedding_dtype, "vocabulary": list(spec.vocab.names),
        "files": files, **counts, "manifest_rows": manifest.num_rows, "seconds": round(time.time() - started, 2),
        "images_per_s": round(manifest.num_rows / max(time.time() - started, 1e-9), 2),
    }
    if not storage.is_remote(out):
        save_config(config, os.path.join(staging, "_tag_config.yaml"))  # "_": dataset readers skip it
        previous = f"{staging}.previous"
        if os.path.exists(out):
            os.replace(out, previous)
        os.replace(staging, out)
        shutil.rmtree(previous, ignore_errors=True)
    storage.write_bytes(storage.join(out, tag_table.SUCCESS_FILE), json.dumps(success, indent=2).encode())
    print(f"tag table: {counts['rows']} rows ({counts['errors']} errors) in {success['seconds']} s "
          f"({success['images_per_s']} images/s) -> {out}")
    return success
