"""The tagging pipeline on local Ray: every bad input, both decode paths, a killed actor."""

from __future__ import annotations

import io
import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mltag.data.catalog import read_manifest
from mltag.stages.tag import TagConfig, run
from mltag.table import tag_table

pytestmark = pytest.mark.slow


def _image(mode="RGB", size=(48, 40)):
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """One listing per kind of bad or unusual image, plus ordinary ones."""
    d = tmp_path_factory.mktemp("zoo")
    jpg = io.BytesIO()
    _image().save(jpg, "JPEG")
    good = jpg.getvalue()
    files = {
        "good": good,
        "truncated": good[: len(good) // 2],
        "zero_bytes": b"",
        "not_an_image": b"<html>404 not found</html>",
        "corrupt": good[:30] + bytes(range(256)) * 4,
    }
    paths = {}
    for name, data in files.items():
        paths[name] = d / f"{name}.jpg"
        paths[name].write_bytes(data)
    makers = {
        "cmyk": lambda p: _image("CMYK").save(p, "JPEG"),
        "sixteen_bit": lambda p: Image.fromarray(np.full((30, 30), 40000, np.uint16)).save(p, "PNG"),
        "palette": lambda p: _image("P").save(p, "PNG"),
        "alpha": lambda p: _image("RGBA").save(p, "PNG"),
        "animated": lambda p: _image("P").save(p, "GIF", save_all=True, append_images=[_image("P")]),
        "bomb": lambda p: Image.new("L", (9000, 9000)).save(p, "PNG"),  # 81 Mpx in a few KB
    }
    for name, make in makers.items():
        paths[name] = d / f"{name}.{'jpg' if name == 'cmyk' else 'gif' if name == 'animated' else 'png'}"
        make(paths[name])
    uris = {
        **{k: str(v) for k, v in paths.items()},
        "missing": str(d / "missing.jpg"),
        "permission_denied": "/proc/sys/vm/drop_caches" if os.geteuid() == 0 else str(d / "locked.jpg"),
    }
    if os.geteuid() != 0:
        (d / "locked.jpg").write_bytes(good)
        os.chmod(d / "locked.jpg", 0)
    manifest = d / "manifest.parquet"
    pq.write_table(pa.table({"listing_id": list(uris), "image_uri": list(uris.values()), "price": list(range(len(uris)))}), manifest)
    return manifest


EXPECTED_ERRORS = {
    "truncated": "corrupt",
    "zero_bytes": "empty",
    "not_an_image": "not an image",
    "corrupt": "",
    "bomb": "too many pixels",
    "missing": "missing",
    "permission_denied": "permission denied",
}
VALID = {"good", "cmyk", "sixteen_bit", "palette", "alpha", "animated"}


@pytest.mark.parametrize("decode_on", ["cpu", "actor"])
def test_every_bad_input_is_an_error_row_and_nothing_is_lost(ray_local, zoo, tiny_model_dir, tmp_path, decode_on):
    success = run(
        TagConfig(
            manifest=str(zoo),
            model=tiny_model_dir,
            out=str(tmp_path / "tags"),
            snapshot="2026-11-23",
            batch_size=4,
            decode_batch_size=3,
            decode_on=decode_on,
            max_pixels=50_000_000,
            max_error_rate=1.0,
        )
    )
    table = tag_table.read_rows(str(tmp_path / "tags"))
    rows = {r["listing_id"]: r for r in table.to_pylist()}
    assert success["rows"] == success["manifest_rows"] == len(rows) == table.num_rows == 13
    for name, fragment in EXPECTED_ERRORS.items():
        assert rows[name]["error"] is not None and fragment in rows[name]["error"], (name, rows[name]["error"])
        assert rows[name]["embedding"] is None and rows[name]["tags"] == [] and rows[name]["error_reason"] is not None
    for name in VALID:
        assert rows[name]["error"] is None, (name, rows[name]["error"])
        assert len(rows[name]["embedding"]) == success["embedding_dim"] and len(rows[name]["scores"]) == len(success["vocabulary"])
    assert success["errors"] == len(EXPECTED_ERRORS) == sum(success["error_reasons"].values())
    assert success["error_reasons"]["missing"] == 1 and success["error_reasons"]["too_many_pixels"] == 1
    manifest = pq.read_table(zoo).to_pylist()
    assert {r["listing_id"]: rows[r["listing_id"]]["price"] for r in manifest} == {r["listing_id"]: r["price"] for r in manifest}


def test_both_decode_paths_agree_on_valid_images(ray_local, tiny_catalog, tiny_model_dir, tmp_path):
    results = {}
    for decode_on in ("cpu", "actor"):
        run(TagConfig(manifest=tiny_catalog["manifest"], model=tiny_model_dir, out=str(tmp_path / decode_on), decode_on=decode_on))
        table = tag_table.read_rows(str(tmp_path / decode_on)).sort_by("listing_id")
        results[decode_on] = np.asarray(table.column("scores").combine_chunks().flatten()).reshape(table.num_rows, -1)
    np.testing.assert_allclose(results["cpu"], results["actor"], atol=0.05)


def test_killed_inference_actor_loses_and_duplicates_nothing(ray_local, state_api_of_this_cluster, tiny_catalog, tiny_model_dir, tmp_path):
    from ray.util.state import list_actors

    base = read_manifest(tiny_catalog["manifest"])
    # 480 rows: the same images under many listing ids, enough batches for a kill mid-run.
    table = pa.concat_tables(
        [base.set_column(0, "listing_id", pa.array([f"{i}-{k}" for i in base.column("listing_id").to_pylist()])) for k in range(10)]
    )
    manifest = tmp_path / "big.parquet"
    pq.write_table(table, manifest)
    outcome: dict = {}

    def tag():
        outcome["success"] = run(
            TagConfig(
                manifest=str(manifest), model=tiny_model_dir, out=str(tmp_path / "t"), batch_size=4, decode_batch_size=4, num_actors=1
            )
        )

    thread = threading.Thread(target=tag, daemon=True)
    thread.start()
    killed, deadline = None, time.time() + 120
    while killed is None and time.time() < deadline and thread.is_alive():
        actors = list_actors(filters=[("state", "=", "ALIVE")])
        workers = [a for a in actors if "TaggerActor" in (a.class_name or "")]
        if workers and workers[0].pid:
            time.sleep(1.0)  # let it tag a few batches first
            os.kill(workers[0].pid, signal.SIGKILL)
            killed = workers[0].pid
        time.sleep(0.2)
    thread.join(timeout=600)
    assert killed is not None, "the tagging actor was never seen alive"
    success = outcome["success"]
    out = tag_table.read_rows(str(tmp_path / "t"))
    ids = out.column("listing_id").to_pylist()
    assert success["rows"] == len(ids) == len(set(ids)) == table.num_rows
    assert set(ids) == set(table.column("listing_id").to_pylist())
    assert success["errors"] == 0


@pytest.mark.parametrize("decode_on", ["cpu", "actor"])
def test_decode_and_inference_are_separate_operators(ray_local, tiny_catalog, tiny_model_dir, decode_on):
    """Ray Data fuses adjacent maps with equal resources; a decode fused into the actor would take
    turns with the model. The optimised physical plan must keep them apart."""
    from mltag.tagging.pipeline import build_pipeline, physical_plan

    config = TagConfig(manifest=tiny_catalog["manifest"], model=tiny_model_dir, decode_on=decode_on)
    plan = physical_plan(build_pipeline(config, read_manifest(tiny_catalog["manifest"])))
    operators = [line.strip("+- ").strip() for line in plan.splitlines() if line.strip()]
    stage = "decode_batch" if decode_on == "cpu" else "fetch_batch"
    actor = [op for op in operators if "TaggerActor" in op]
    decode = [op for op in operators if stage in op]
    assert len(actor) == 1 and actor[0].startswith("ActorPoolMapOperator"), plan
    assert len(decode) == 1 and decode[0].startswith("TaskPoolMapOperator") and "TaggerActor" not in decode[0], plan


def test_the_driver_plans_the_pipeline_without_torch_or_timm(tiny_catalog, tiny_model_dir):
    """Only the actors run the model: a driver that imported torch and timm to name the actor's
    class spent ~6 s of a core in every tagging job, beside the workers starting up."""
    import subprocess
    import sys

    code = (
        "import sys, ray\n"
        "from mltag.data.catalog import read_manifest\n"
        "from mltag.tagging.pipeline import TagConfig, build_pipeline, physical_plan\n"
        "ray.init(address='local', num_cpus=2, include_dashboard=False)\n"
        f"config = TagConfig(manifest={tiny_catalog['manifest']!r}, model={tiny_model_dir!r})\n"
        "print(physical_plan(build_pipeline(config, read_manifest(config.manifest))).splitlines()[0])\n"
        "print('HEAVY', sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ActorPoolMapOperator[MapBatches(PooledTaggerActor)]" in out.stdout and "HEAVY []" in out.stdout, out.stdout


def test_equal_decode_and_actor_cpus_are_refused():
    with pytest.raises(ValueError, match="decode_cpus must .* differ from cpus_per_actor"):
        TagConfig(manifest="m.parquet", model="m", decode_cpus=1, cpus_per_actor=1).validate()
