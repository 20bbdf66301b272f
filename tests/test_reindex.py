"""The nightly re-index over two nights of a changing catalog and a repeated night: one MERGE commit a night that
tags only what changed, leaves the rest untouched, retries a transient failure, drops repeated
rows, and time-travels back to any night."""

from __future__ import annotations

import http.server
import os
import shutil
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mltag.data.catalog import read_manifest
from mltag.search import EmbeddingIndex, IndexConfig, build_index
from mltag.stages.reindex import ReindexConfig, plan, run
from mltag.table import delta_table, tag_table

pytestmark = pytest.mark.slow


def _keyed(table: pa.Table) -> dict:
    return {(r["listing_id"], r["image_uri"]): r for r in table.to_pylist()}


@pytest.mark.parametrize(
    "previous, today, model, expected",
    [
        # unchanged, fingerprint changed, new
        (
            [("a", "1", "x", "v", None), ("b", "2", "y", "v", None)],
            [("a", "1", "x"), ("b", "2", "Y"), ("d", "4", "w")],
            "v",
            ["unchanged", "changed", "new"],
        ),
        # a new model re-tags everything
        ([("a", "1", "x", "v", None)], [("a", "1", "x")], "v2", ["changed"]),
        # same bytes: a transient failure is retried, a permanent one is not
        (
            [("a", "1", "x", "v", "timeout"), ("b", "2", "y", "v", "not_an_image"), ("c", "3", "z", "v", "permission_denied")],
            [("a", "1", "x"), ("b", "2", "y"), ("c", "3", "z")],
            "v",
            ["retry", "unchanged", "retry"],
        ),
        # an unreadable image (no fingerprint) is always tagged again
        ([("a", "1", "", "v", "missing")], [("a", "1", "")], "v", ["changed"]),
    ],
)
def test_plan_classifies_each_row(previous, today, model, expected):
    prev = pa.table(
        {
            name: [row[i] for row in previous]
            for i, name in enumerate(["listing_id", "image_uri", "fingerprint", "model_version", "error_reason"])
        },
        schema=pa.schema([(n, pa.string()) for n in ["listing_id", "image_uri", "fingerprint", "model_version", "error_reason"]]),
    )
    now = pa.table({name: [row[i] for row in today] for i, name in enumerate(["listing_id", "image_uri", "fingerprint"])})
    outcome, deleted = plan(now, prev, model)
    assert outcome.to_pylist() == expected
    assert deleted.num_rows == len({r[:2] for r in previous} - {r[:2] for r in today})


def test_plan_lists_deleted_keys():
    prev = pa.table({"listing_id": ["a", "c"], "image_uri": ["1", "3"], "fingerprint": ["x", "z"], "model_version": ["v", "v"]})
    outcome, deleted = plan(pa.table({"listing_id": ["a"], "image_uri": ["1"], "fingerprint": ["x"]}), prev, "v")
    assert outcome.to_pylist() == ["unchanged"] and deleted.to_pylist() == [{"listing_id": "c", "image_uri": "3"}]


class FlakyImageServer:
    """A loopback HTTP server for one image: HEAD always answers (so its fingerprint is stable),
    GET answers 503 until ``heal()``: a transient storage failure that goes away."""

    def __init__(self, data: bytes):
        owner = self
        self.healthy = False

        class Handler(http.server.BaseHTTPRequestHandler):
            def _headers(self, status):
                self.send_response(status)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(data) if status == 200 else 0))
                self.send_header("ETag", '"v1"')
                self.end_headers()

            def do_HEAD(self):  # noqa: N802
                self._headers(200)

            def do_GET(self):  # noqa: N802
                if owner.healthy:
                    self._headers(200)
                    self.wfile.write(data)
                else:
                    self._headers(503)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/flaky.jpg"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def heal(self):
        self.healthy = True


def test_two_nights_and_a_repeat(ray_local, tiny_catalog, tiny_model_dir, tmp_path):
    catalog = tmp_path / "catalog"
    shutil.copytree(tiny_catalog["out"], catalog)
    day1 = read_manifest(str(catalog / "manifest.parquet")).select(["listing_id", "image_uri", "tags"])
    ids, uris = day1.column("listing_id").to_pylist(), day1.column("image_uri").to_pylist()
    flaky = FlakyImageServer((catalog / "images" / os.path.basename(uris[0])).read_bytes())
    table_uri, index_dir = str(tmp_path / "tag_table"), str(tmp_path / "index")
    http_ok = dict(allowed_schemes="file,http", allow_private_networks=True, fetch_timeout_s=5)

    def night(rows: pa.Table, snapshot: str, **extra) -> dict:
        path = tmp_path / f"{snapshot}.parquet"
        pq.write_table(rows, path)
        return run(
            ReindexConfig(manifest=str(path), model=tiny_model_dir, table=table_uri, snapshot=snapshot, shard_rows=16, **http_ok, **extra)
        )

    # Night 1: the catalog plus one listing whose image server is failing (503: transient).
    night1 = pa.concat_tables(
        [day1, pa.table({"listing_id": ["FLAKY"], "image_uri": [flaky.url], "tags": pa.array([[]], pa.list_(pa.string()))})]
    )
    first = night(night1, "2026-11-20")
    assert first["new"] == 49 and first["errors"] == 1 and first["error_reasons"] == {"fetch_failed": 1}
    after_night1 = tag_table.read_rows(table_uri)
    build_index(IndexConfig(tag_table=table_uri, out=index_dir))

    # Night 2: two photos replaced, two listings gone, three new, one row repeated, the server healed.
    rng = np.random.default_rng(0)
    for uri in uris[:2]:
        time.sleep(0.01)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(uri, "JPEG")
    new_uris = []
    for k in range(3):
        path = catalog / "images" / f"new{k}.jpg"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, "JPEG")
        new_uris.append(str(path))
    flaky.heal()
    kept = [i for i in range(48) if i not in (2, 3)]
    night2 = pa.table(
        {
            "listing_id": [ids[i] for i in kept] + ["N0", "N1", "N2", "FLAKY", ids[5]],
            "image_uri": [uris[i] for i in kept] + new_uris + [flaky.url, uris[5]],
        }
    )
    second = night(night2, "2026-11-21", index=index_dir)
    assert (second["new"], second["changed"], second["retry"], second["unchanged"], second["deleted"]) == (3, 2, 1, 44, 2)
    assert second["duplicates_dropped"] == 1 and second["errors"] == 0 and second["rows"] == 50
    after_night2 = tag_table.read_rows(table_uri)
    before, after = _keyed(after_night1), _keyed(after_night2)
    assert len(after) == after_night2.num_rows == 50  # 48 - 2 + 3 + FLAKY
    unchanged = [(ids[i], uris[i]) for i in kept[2:]]
    assert len(unchanged) == 44 and all(after[k] == before[k] for k in unchanged)  # untouched, value for value
    assert all(after[(ids[i], uris[i])]["embedding"] != before[(ids[i], uris[i])]["embedding"] for i in range(2))
    healed = after[("FLAKY", flaky.url)]
    assert healed["error"] is None and len(healed["embedding"]) > 0 and before[("FLAKY", flaky.url)]["error"] is not None
    history = delta_table.history_entries(delta_table.open_table(table_uri))
    assert [h["operation"] for h in history] == ["MERGE", "CREATE TABLE"]  # one commit a night
    index = EmbeddingIndex.load(index_dir)
    listed = index.ids.column("listing_id").to_pylist()
    assert len(listed) == len(set(listed)) == 50 and ids[2] not in listed and "FLAKY" in listed and "N2" in listed
    assert index.meta["table_version"] == 1

    # The same night again: nothing to do, nothing doubled, the index untouched.
    again = night(night2, "2026-11-21", index=index_dir)
    assert again["committed"] is False and delta_table.latest_version(table_uri) == 1
    assert tag_table.read_rows(table_uri).num_rows == 50 == len(EmbeddingIndex.load(index_dir))
    # Time travel: as of night 1 is night 1, exactly.
    assert tag_table.read_rows(table_uri, as_of="2026-11-20").sort_by("listing_id").equals(after_night1.sort_by("listing_id"))
    assert tag_table.read_rows(table_uri, as_of="2026-11-21").num_rows == 50
    flaky.server.shutdown()


def test_a_new_model_retags_everything_in_one_overwrite(ray_local, tiny_catalog, tiny_model_dir, tmp_path):
    import torch

    from mltag.data.vocabulary import Vocabulary
    from mltag.tagger.model import Tagger, TaggerSpec, save_tagger

    manifest = tmp_path / "m.parquet"
    pq.write_table(read_manifest(tiny_catalog["manifest"]).slice(0, 12), manifest)
    table_uri, index_dir = str(tmp_path / "t"), str(tmp_path / "index")
    run(ReindexConfig(manifest=str(manifest), model=tiny_model_dir, table=table_uri, snapshot="2026-11-20", index=index_dir))
    torch.manual_seed(1)
    vocab = Vocabulary.load(tiny_catalog["vocabulary"])
    other = str(tmp_path / "model-v2")
    spec = save_tagger(
        Tagger("test_efficientnet", len(vocab)), TaggerSpec(backbone="test_efficientnet", vocabulary=vocab.to_dict(), img_size=64), other
    )
    summary = run(ReindexConfig(manifest=str(manifest), model=other, table=table_uri, snapshot="2026-11-21", index=index_dir))
    assert summary["mode"] == "overwrite" and summary["new"] == 12
    rows = tag_table.read_rows(table_uri)
    assert set(rows.column("model_version").to_pylist()) == {spec.version} and rows.num_rows == 12
    index = EmbeddingIndex.load(index_dir)
    assert index.meta["model_version"] == spec.version and len(index) == 12 and index.meta["table_version"] == 1


def test_a_night_and_a_retry_with_a_chain_record_the_specialists(ray_local, tiny_catalog, tiny_model_dir, tmp_path):
    """A night with a chain, on a table written without one, tags its new rows through the chain
    (its MERGE adds the specialists column; rows tagged before keep null there), and a retry of the
    error rows with the chain heals them with their specialists' tags."""
    import torch
    import yaml

    from mltag.stages.tag import TagConfig
    from mltag.stages.tag import run as tag_run
    from mltag.tagger.embed import tag_images
    from mltag.tagger.model import Tagger, TaggerSpec, save_tagger, set_thresholds

    # The general model's threshold for one tag sits between two photos' scores: one photo
    # triggers that tag's specialist, the other does not.
    general = tmp_path / "general"
    shutil.copytree(tiny_model_dir, general)
    uris = read_manifest(tiny_catalog["manifest"]).column("image_uri").to_pylist()[:12]
    scores, _, _ = tag_images(uris, str(general))
    trigger = int(np.argmax(scores.max(axis=0) - scores.min(axis=0)))
    high, low = uris[int(np.argmax(scores[:, trigger]))], uris[int(np.argmin(scores[:, trigger]))]
    thresholds = [0.5] * scores.shape[1]
    thresholds[trigger] = float(scores[:, trigger].max() + scores[:, trigger].min()) / 2
    names = set_thresholds(str(general), thresholds).vocab.names
    torch.manual_seed(2)
    save_tagger(
        Tagger("test_efficientnet", 3),
        TaggerSpec(backbone="test_efficientnet", vocabulary={"tags": ["red", "green", "blue"]}, img_size=48),
        str(tmp_path / "spec_colour"),
    )
    chain = tmp_path / "chain.yaml"
    chain.write_text(yaml.safe_dump({"specialists": [{"name": "colour", "model": "spec_colour", "when": [names[trigger]]}]}))

    table = str(tmp_path / "table")
    late, again = tmp_path / "late.jpg", tmp_path / "again.jpg"  # late: missing until the retry; again: the trigger photo re-posted
    shutil.copy(high, again)

    def night(rows: dict, snapshot: str, **chained) -> dict:
        manifest = tmp_path / f"{snapshot}.parquet"
        pq.write_table(pa.table({"listing_id": list(rows), "image_uri": [str(u) for u in rows.values()]}), manifest)
        run(ReindexConfig(manifest=str(manifest), model=str(general), table=table, snapshot=snapshot, max_error_rate=0.5, **chained))
        return {r["listing_id"]: r for r in tag_table.read_rows(table).to_pylist()}

    rows = night({"HIGH": high, "LATE": late}, "night1")
    assert "specialists" not in rows["HIGH"] and rows["LATE"]["error"] is not None
    rows = night({"HIGH": high, "LATE": late, "LOW": low, "AGAIN": again}, "night2", chain=str(chain))
    assert rows["HIGH"]["specialists"] is None  # unchanged tonight: tagged before the chain
    assert rows["LOW"]["specialists"] == [] and [e["name"] for e in rows["AGAIN"]["specialists"]] == ["colour"]

    shutil.copy(high, late)
    tag_run(TagConfig(model=str(general), out=table, retry_errors=True, chain=str(chain)))
    rows = {r["listing_id"]: r for r in tag_table.read_rows(table).to_pylist()}
    assert rows["LATE"]["error"] is None and names[trigger] in rows["LATE"]["tags"]
    assert rows["LATE"]["specialists"] == rows["AGAIN"]["specialists"]  # the same photo: the same specialist result
