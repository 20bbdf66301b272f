"""Safe by default: hostile inputs give error rows or clear refusals, never a crash, a leak or code
execution. Each test plays the attacker: a manifest row pointing at the metadata endpoint or
/etc/passwd, a PostScript file, a presigned URL, a server that never answers, a pickle planted in
a checkpoint, a tampered model, an IVF index with near-empty lists, tag names that are HTML."""

from __future__ import annotations

import http.server
import io
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mltag.data.identifiers import IDENTIFIER_PATTERN, validate_identifier
from mltag.data.images import HEIF_PLUGIN, decode_batch, fetch_batch, pixels_from_arrow
from mltag.data.uri_policy import FetchPolicy, redact_uri

SECRETS = ("deadbeefsignature", "AKIAEXAMPLEKEY", "hunter2")
PRESIGNED_QUERY = (
    "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLEKEY%2F20260101%2Fus-west-2&X-Amz-Signature=deadbeefsignature"
)
WEB = FetchPolicy(allowed_schemes=("file", "s3", "http", "https"))
WEB_PRIVATE = FetchPolicy(allowed_schemes=("file", "http"), allow_private_networks=True, fetch_timeout_s=1)


def _jpeg(path: Path) -> str:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path, "JPEG")
    return str(path)


def _rows(uris: list[str], policy: FetchPolicy | None = None, size: int = 8) -> list[dict]:
    """decode_batch over a real pyarrow table, as Ray Data calls it; every row comes back."""
    batch = pa.table({"listing_id": [f"L{i}" for i in range(len(uris))], "image_uri": uris})
    out = decode_batch(batch, size=size, max_pixels=10_000_000, **({"policy": policy} if policy else {}))
    assert out.num_rows == len(uris) and out.column("listing_id").to_pylist() == batch.column("listing_id").to_pylist()
    pixels = pixels_from_arrow(out.column("pixels"), size)
    rows = out.select(["listing_id", "error"]).to_pylist()
    for row, image in zip(rows, pixels):
        if row["error"] is not None:
            assert not image.any()  # an error row carries no pixels
    return rows


# ---- loopback servers the tests control ---------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    jpeg = b""

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/photo.jpg":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.jpeg)))
            self.end_headers()
            self.wfile.write(self.jpeg)
        elif path == "/echo":  # a server that copies the request, signature and all, into its error
            self.send_response(500, f"cannot serve {self.path}")
            self.end_headers()
        elif path == "/to-passwd":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        elif path == "/to-metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/iam/security-credentials/")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def web_server(tmp_path):
    _Handler.jpeg = Path(_jpeg(tmp_path / "served.jpg")).read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def silent_server():
    """Accepts connections and never says a word: the hung object that stalls a task."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    listener.close()


# ---- which URIs may be fetched --------------------------------------------------------------------
@pytest.mark.parametrize(
    "uri,policy,expected",
    [
        (
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            None,
            "refused uri: scheme 'http' is not in allowed_schemes [file, s3]",
        ),
        ("https://example.com/photo.jpg", None, "refused uri: scheme 'https' is not in allowed_schemes [file, s3]"),
        (
            "http://169.254.169.254/latest/meta-data/",
            WEB,
            "refused uri: host '169.254.169.254' resolves to non-public address 169.254.169.254",
        ),
        ("http://[::ffff:169.254.169.254]/latest/meta-data/", WEB, "refused uri: host '::ffff:169.254.169.254' resolves to non-public"),
        ("http://localhost:8265/api/jobs/", WEB, "refused uri: host 'localhost' resolves to non-public address"),
        ("http://10.0.0.7/a.jpg", WEB, "refused uri: host '10.0.0.7' resolves to non-public address"),
        ("gs://bucket/a.jpg", None, "refused uri: scheme 'gs' is not in allowed_schemes [file, s3]"),
        ("simplecache::s3://bucket/a.jpg", None, "refused uri: scheme 'simplecache::s3' is not in allowed_schemes"),
        (
            "s3://other-bucket/a.jpg",
            FetchPolicy(allowed_roots=("s3://catalog/images/",)),
            "refused uri: s3://other-bucket/a.jpg is outside allowed_roots [s3://catalog/images/]",
        ),
        ("s3://catalog/images/../secrets/a.jpg", FetchPolicy(allowed_roots=("s3://catalog/images/",)), "refused uri:"),
    ],
)
def test_refused_uris_are_error_rows_naming_the_rule(uri, policy, expected):
    (row,) = _rows([uri], policy)
    assert row["error"].startswith(expected), row["error"]


def test_local_files_outside_allowed_roots_are_refused_symlinks_included(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    good = _jpeg(root / "ok.jpg")
    (root / "escape.jpg").symlink_to("/etc/passwd")
    policy = FetchPolicy(allowed_roots=(str(root),))
    rows = _rows([good, "file:///etc/passwd", "/etc/passwd", str(root / ".." / ".." / "etc" / "passwd"), str(root / "escape.jpg")], policy)
    assert rows[0]["error"] is None
    for row in rows[1:]:
        assert row["error"].startswith("refused uri:") and f"outside allowed_roots [{root}]" in row["error"], row
    assert all("root:" not in (r["error"] or "") for r in rows)  # not a byte of the file in the error


def test_http_is_fetched_only_when_allowed_and_then_through_the_policy(web_server):
    ok, echo = f"{web_server}/photo.jpg", f"{web_server}/echo"
    assert _rows([ok])[0]["error"].startswith("refused uri: scheme 'http'")
    assert _rows([ok], WEB)[0]["error"].startswith("refused uri: host '127.0.0.1' resolves to non-public")
    rows = _rows([ok, f"{web_server}/nope.jpg", f"{web_server}/to-passwd", echo + "?x=1"], WEB_PRIVATE)
    assert rows[0]["error"] is None  # fetched and decoded
    assert rows[1]["error"] == f"missing: {web_server}/nope.jpg does not exist"
    assert rows[2]["error"].startswith("refused uri: file:///etc/passwd is not an http(s) URL")  # a redirect is checked too
    assert rows[3]["error"].startswith(f"fetch failed after 3 attempts: {web_server}/echo: HTTP 500")  # transient: retried


def test_a_redirect_to_the_metadata_endpoint_is_refused(web_server):
    # The first hop is allowed by its roots; the redirect leaves them.
    policy = FetchPolicy(allowed_schemes=("http",), allow_private_networks=True, allowed_roots=(web_server + "/",))
    (row,) = _rows([f"{web_server}/to-metadata"], policy)
    assert row["error"].startswith(
        "refused uri: http://169.254.169.254/latest/meta-data/iam/security-credentials/ is outside allowed_roots"
    )


def test_presigned_and_credentialed_uris_never_leak_into_errors(web_server):
    base = web_server.replace("http://", "http://reader:hunter2@")
    uris = [f"{base}/missing.jpg{PRESIGNED_QUERY}", f"{base}/echo{PRESIGNED_QUERY}"]
    metadata = f"http://reader:hunter2@169.254.169.254/x.jpg{PRESIGNED_QUERY}"
    for policy, batch in ((None, uris + [metadata]), (WEB, uris + [metadata]), (WEB_PRIVATE, uris)):
        for row in _rows(batch, policy):
            assert row["error"] is not None
            assert not any(secret in row["error"] for secret in SECRETS), row["error"]
    # Through fetch_batch (the device-decode path) as well.
    out = fetch_batch(pa.table({"listing_id": ["a", "b"], "image_uri": uris[:2]}), policy=WEB_PRIVATE)
    errors = out.column("error").to_pylist()
    assert errors[0] == f"missing: {web_server}/missing.jpg does not exist"
    assert not any(secret in e for e in errors for secret in SECRETS)


@pytest.mark.parametrize(
    "uri,shown",
    [
        ("https://bucket.s3.amazonaws.com/a.jpg" + PRESIGNED_QUERY, "https://bucket.s3.amazonaws.com/a.jpg"),
        ("https://user:pw@cdn.example.com:8443/p/a.jpg?token=abc#frag", "https://cdn.example.com:8443/p/a.jpg"),
        ("s3://bucket/key.jpg?versionId=3", "s3://bucket/key.jpg"),
        ("HTTPS://host?sig=1", "HTTPS://host"),
        ("/data/images/a.jpg", "/data/images/a.jpg"),
        ("relative/a.jpg", "relative/a.jpg"),
    ],
)
def test_redact_uri(uri, shown):
    assert redact_uri(uri) == shown


def test_a_server_that_never_answers_times_out_as_a_transient_error(silent_server):
    started = time.monotonic()
    rows = _rows([f"{silent_server}/slow.jpg{PRESIGNED_QUERY}", f"{silent_server}/slow2.jpg"], WEB_PRIVATE)
    elapsed = time.monotonic() - started
    assert rows[0]["error"] == f"timeout: no answer from {silent_server}/slow.jpg within 1 s"
    assert rows[1]["error"].startswith("timeout:")
    assert elapsed < 6, elapsed  # two 1 s deadlines, not retries, not a hang


# ---- which formats may be decoded ----------------------------------------------------------------
def _heic_bytes(major: bytes = b"heic", compatible: bytes = b"mif1heic") -> bytes:
    """The start of an iPhone photo: an ISO-BMFF ftyp box, then a (truncated) meta box."""
    ftyp = b"ftyp" + major + b"\x00\x00\x00\x00" + compatible
    return len(ftyp + b"\x00" * 4).to_bytes(4, "big") + ftyp + b"\x00\x00\x00\x40meta" + bytes(60)


def test_formats_outside_the_allow_list_are_refused_before_any_decoder_runs(tmp_path):
    eps = tmp_path / "drawing.eps"
    Image.new("RGB", (20, 20), "red").save(eps, "EPS")  # real PostScript: Pillow would hand it to Ghostscript
    ico = tmp_path / "favicon.ico"
    Image.new("RGB", (16, 16), "blue").save(ico, "ICO")
    png = tmp_path / "ok.png"
    Image.new("RGB", (16, 16), "green").save(png, "PNG")
    rows = _rows([str(eps), str(ico), str(png)])
    assert rows[0]["error"].startswith("unsupported format: EPS (allowed: JPEG, PNG, WEBP, GIF, TIFF, BMP")
    assert rows[1]["error"].startswith("unsupported format: ICO")
    assert rows[2]["error"] is None
    # A policy can narrow the list further.
    assert _rows([str(png)], FetchPolicy(formats=("JPEG",)))[0]["error"].startswith("unsupported format: PNG (allowed: JPEG)")


@pytest.mark.skipif(HEIF_PLUGIN, reason="pillow-heif is installed: HEIC is a supported format here")
@pytest.mark.parametrize("major,compatible", [(b"heic", b"mif1heic"), (b"mif1", b"mif1heic"), (b"heix", b"mif1heix")])
def test_heic_without_the_plugin_says_how_to_get_it(tmp_path, major, compatible):
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(_heic_bytes(major, compatible))
    (row,) = _rows([str(path)])
    assert row["error"] == "unsupported format: HEIC (install mltag[heif])"


def test_fetch_batch_applies_the_same_format_policy(tmp_path):
    eps = tmp_path / "d.eps"
    Image.new("RGB", (8, 8)).save(eps, "EPS")
    out = fetch_batch(pa.table({"listing_id": ["a"], "image_uri": [str(eps)]}))
    assert out.column("error").to_pylist()[0].startswith("unsupported format: EPS")
    assert out.column("image_bytes").to_pylist() == [None]


def test_decode_on_device_never_decodes_a_format_the_policy_refuses(tmp_path):
    from mltag.data.device_decode import decode_on_device

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, "JPEG")
    _, failures = decode_on_device([buf.getvalue()], 8, torch.device("cpu"), policy=FetchPolicy(formats=("PNG",)))
    assert failures[0].startswith("unsupported format: JPEG (allowed: PNG)")


def test_fetch_policy_is_validated_and_travels_as_a_value():
    import pickle

    policy = FetchPolicy(allowed_schemes=["FILE", "s3"], formats=["jpeg"], fetch_timeout_s=5)
    assert policy.allowed_schemes == ("file", "s3") and policy.formats == ("JPEG",)
    assert pickle.loads(pickle.dumps(policy)) == policy  # Ray fn_kwargs pickle it
    with pytest.raises(ValueError, match="fetch_timeout_s"):
        FetchPolicy(fetch_timeout_s=0)
    with pytest.raises(ValueError, match="not a URI scheme"):
        FetchPolicy(allowed_schemes=("s3://",))


# ---- identifiers that become paths ----------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    ["..", "../models", "runs/../../etc", "/etc", "a/b", "a\\b", "", ".hidden", "-flag", "a..b", "x" * 129, "run\n", "naïve", None, 7],
)
def test_identifiers_that_could_leave_their_directory_are_refused(value):
    with pytest.raises(ValueError) as info:
        validate_identifier("run id", value)
    assert IDENTIFIER_PATTERN in str(info.value) and "run id" in str(info.value)


@pytest.mark.parametrize("value", ["mltag-train", "nightly_2026-11-23", "v3.1", "A", "x" * 128])
def test_ordinary_identifiers_pass(value):
    assert validate_identifier("name", value) == value


def test_training_name_is_validated_with_the_config():
    from mltag.config import ConfigError, config_from_dict
    from mltag.stages.train import TrainConfig

    with pytest.raises(ValueError, match="name '../../shared' is not a valid identifier"):
        config_from_dict(TrainConfig, {"manifest": "m.parquet", "name": "../../shared"})
    with pytest.raises((ValueError, ConfigError), match="auto, never, force"):
        config_from_dict(TrainConfig, {"manifest": "m.parquet", "resume": "maybe"})


# ---- checkpoints: tensors and JSON only ---------------------------------------------------------
class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _plant(directory: Path, marker: Path) -> None:
    torch.save({"model": {"w": torch.zeros(1)}, "optimizer": _Payload(str(marker))}, directory / "state.pt")


def test_a_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    from mltag.tagger.train_state import UnsafeCheckpointError, load_training_state

    marker = tmp_path / "pwned"
    _plant(tmp_path, marker)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load checkpoint .*state\.pt: it holds a reference to exec"):
        load_training_state(str(tmp_path))
    assert not marker.exists()
    # The plant is real: the old loader (weights_only=False) would have run it.
    torch.load(tmp_path / "state.pt", weights_only=False)
    assert marker.read_text() == "pwned"


def test_checkpoint_state_round_trips_with_rng_states(tmp_path):
    import random

    from mltag.tagger.train_state import capture_rng, load_training_state, restore_rng, save_training_state

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    rng_tensors, rng_meta = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    save_training_state(
        str(tmp_path),
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_tensors},
        {"epoch": 3, "step": 30, "history": [{"val_map": np.float32(0.5)}], "rng": rng_meta},
    )
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # what a reseeding restart would do
    tensors, meta = load_training_state(str(tmp_path))
    restore_rng(tensors["rng"], meta["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected  # continues, not reseeded
    assert meta["epoch"] == 3 and meta["history"] == [{"val_map": 0.5}]
    torch.testing.assert_close(tensors["model"]["weight"], model.weight.detach())
    assert json.loads((tmp_path / "training_state.json").read_text())["step"] == 30


# ---- re-runs of a training name -------------------------------------------------------------------
def _inputs(**overrides):
    base = {"manifest_sha256": "m1", "vocabulary_sha256": "v1", "config_sha256": "c1", "config": {"lr": 0.001, "loss": "asl"}}
    return {**base, **overrides}


@pytest.mark.parametrize(
    "record,exists,current,resume,outcome",
    [
        (None, False, _inputs(), "auto", "start"),
        (None, False, _inputs(), "never", "start"),
        ({"inputs": _inputs()}, True, _inputs(), "auto", "resume"),
        ({"inputs": _inputs()}, True, _inputs(manifest_sha256="m2"), "auto", "the manifest's content"),
        ({"inputs": _inputs()}, True, _inputs(vocabulary_sha256="v2"), "auto", "the vocabulary"),
        (
            {"inputs": _inputs()},
            True,
            _inputs(config_sha256="c2", config={"lr": 0.002, "loss": "asl"}),
            "auto",
            "config lr (0.001 -> 0.002)",
        ),
        ({"inputs": _inputs()}, True, _inputs(manifest_sha256="m2"), "force", "resume"),
        ({"inputs": _inputs()}, True, _inputs(), "never", "--resume is never"),
        (None, True, _inputs(), "auto", "no record of its inputs"),
        (None, True, _inputs(), "force", "resume"),
    ],
)
def test_resume_decision(record, exists, current, resume, outcome):
    from mltag.stages.train import RunInputsChanged, resume_decision

    if outcome in ("start", "resume"):
        assert resume_decision(record, exists, current, resume, "/runs/x") == outcome
    else:
        with pytest.raises(RunInputsChanged, match=outcome.replace("(", r"\(").replace(")", r"\)")):
            resume_decision(record, exists, current, resume, "/runs/x")


def test_placement_fields_do_not_change_a_runs_inputs(tiny_catalog):
    from mltag.data.catalog import read_manifest
    from mltag.data.vocabulary import Vocabulary
    from mltag.stages.train import TrainConfig, run_inputs

    manifest, vocab = read_manifest(tiny_catalog["manifest"], require_tags=True), Vocabulary.load(tiny_catalog["vocabulary"])
    a = run_inputs(TrainConfig(manifest="a", out="x", num_workers=1, epochs=2), manifest, vocab)
    b = run_inputs(TrainConfig(manifest="b", out="y", num_workers=4, epochs=9, storage_path="s3://b/r", max_failures=3), manifest, vocab)
    assert a == b
    assert run_inputs(TrainConfig(manifest="a", lr=0.01), manifest, vocab)["config_sha256"] != a["config_sha256"]
    assert run_inputs(TrainConfig(manifest="a"), manifest.slice(1), vocab)["manifest_sha256"] != a["manifest_sha256"]


@pytest.fixture(scope="module")
def finished_run(ray_local, tiny_catalog, tmp_path_factory):
    """One real, tiny training run (1 epoch), finished and exported."""
    from mltag.data.catalog import read_manifest
    from mltag.stages.train import TrainConfig, run

    work = tmp_path_factory.mktemp("guarded")
    manifest = read_manifest(tiny_catalog["manifest"], require_tags=True)  # absolute image URIs
    pq.write_table(manifest, work / "manifest.parquet")
    common = dict(
        manifest=str(work / "manifest.parquet"),
        vocabulary=tiny_catalog["vocabulary"],
        out=str(work / "out"),
        backbone="test_efficientnet",
        img_size=64,
        batch_size=16,
        augment=False,
        hflip=False,
        cache_decoded=True,
        epochs=1,
        name="guarded",
    )
    spec = run(TrainConfig(**common))
    return {"work": work, "common": common, "spec": spec, "manifest": manifest}


@pytest.mark.slow
def test_a_finished_run_is_not_re_exported_unless_asked(finished_run, capsys):
    from mltag.runtime import log
    from mltag.stages.train import TrainConfig, run

    log.configure()  # as the CLI does: the notice goes to stderr through the mltag logger
    weights = Path(finished_run["common"]["out"]) / "model" / "weights.pt"
    before = weights.stat().st_mtime_ns
    # The same content under another file name is the same input.
    pq.write_table(finished_run["manifest"], finished_run["work"] / "copy.parquet")
    spec = run(TrainConfig(**{**finished_run["common"], "manifest": str(finished_run["work"] / "copy.parquet")}))
    assert "already finished (1 epochs): NOT re-exporting" in capsys.readouterr().err
    assert spec.version == finished_run["spec"].version and weights.stat().st_mtime_ns == before


@pytest.mark.slow
def test_a_rerun_with_other_inputs_is_refused(finished_run):
    from mltag.stages.train import RunInputsChanged, TrainConfig, run

    manifest = finished_run["manifest"]
    pq.write_table(manifest.slice(0, manifest.num_rows - 1), finished_run["work"] / "changed.parquet")  # one listing fewer
    with pytest.raises(RunInputsChanged, match=r"was started with other inputs: the manifest's content differ"):
        run(TrainConfig(**{**finished_run["common"], "manifest": str(finished_run["work"] / "changed.parquet")}))
    with pytest.raises(RunInputsChanged, match=r"config lr \(0.001 -> 0.003\)"):
        run(TrainConfig(**{**finished_run["common"], "lr": 0.003}))
    with pytest.raises(RunInputsChanged, match="--resume is never"):
        run(TrainConfig(**{**finished_run["common"], "resume": "never"}))
    record = json.loads((finished_run["work"] / "out" / "ray_train" / "guarded" / "mltag_run.json").read_text())
    assert record["finished"]["epochs"] == 1 and record["finished"]["model_version"] == finished_run["spec"].version


@pytest.mark.slow
def test_real_checkpoints_hold_only_tensors_and_a_planted_one_is_refused(finished_run, tmp_path):
    from mltag.stages.train import TrainConfig, run
    from mltag.tagger.train_state import UnsafeCheckpointError

    run_dir = finished_run["work"] / "out" / "ray_train" / "guarded"
    states = sorted(run_dir.glob("checkpoint_*/state.pt"))
    assert states
    for state in states:
        torch.load(state, map_location="cpu", weights_only=True)  # loads: nothing but tensors and containers
        assert json.loads((state.parent / "training_state.json").read_text())["rng"]["numpy"][0] == "MT19937"
    backups = {s: s.read_bytes() for s in states}
    marker = tmp_path / "pwned"
    try:
        for state in states:
            _plant(state.parent, marker)
        with pytest.raises(UnsafeCheckpointError, match="refusing to load checkpoint"):
            run(TrainConfig(**{**finished_run["common"], "export_finished": True}))
        assert not marker.exists()
    finally:
        for state, data in backups.items():
            state.write_bytes(data)


# ---- model directories ------------------------------------------------------------------------------
@pytest.fixture()
def saved_model(tmp_path):
    from mltag.tagger.model import Tagger, TaggerSpec, save_tagger

    torch.manual_seed(0)
    out = tmp_path / "model"
    spec = save_tagger(
        Tagger("test_efficientnet", 3),
        TaggerSpec(backbone="test_efficientnet", vocabulary={"tags": ["a", "b", "c"]}, img_size=32),
        str(out),
    )
    return out, spec


def test_a_tampered_model_is_refused_at_load(saved_model):
    from mltag.tagger.model import ModelIntegrityError, load_spec, load_tagger

    out, spec = saved_model
    state = torch.load(out / "weights.pt", weights_only=True)
    state["head.bias"] = state["head.bias"] + 5.0  # "always say tag a"
    torch.save(state, out / "weights.pt")
    assert load_spec(str(out)).version == spec.version  # the cheap read does not hash
    with pytest.raises(ModelIntegrityError, match=rf"refusing to load the tagger .*recorded version {spec.version}"):
        load_tagger(str(out))


def test_a_tampered_tagger_json_is_refused_too(saved_model):
    from mltag.tagger.model import ModelIntegrityError, load_tagger

    out, _ = saved_model
    meta = json.loads((out / "tagger.json").read_text())
    meta["thresholds"] = [0.0, 0.0, 0.0]
    (out / "tagger.json").write_text(json.dumps(meta))
    with pytest.raises(ModelIntegrityError):
        load_tagger(str(out))


def test_saving_stages_and_keeps_other_files(saved_model):
    from mltag.tagger.model import load_tagger, set_thresholds

    out, spec = saved_model
    (out / "thresholds.json").write_text("{}")  # written by calibrate beside the model
    new = set_thresholds(str(out), [0.2, 0.3, 0.4])
    assert new.version != spec.version and load_tagger(str(out))[1].version == new.version
    assert (out / "thresholds.json").exists()
    assert not [p for p in out.parent.iterdir() if ".staging-" in p.name]


# ---- kNN over an IVF index with near-empty lists -------------------------------------------------
def _ivf_index_dir(directory: Path, n: int = 40, dim: int = 16, nlist: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add_with_ids(x, np.arange(n, dtype=np.int64))
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    index.nprobe = 1
    directory.mkdir()
    faiss.write_index(index, str(directory / "index.faiss"))
    pq.write_table(
        pa.table(
            {
                "faiss_id": pa.array(range(n), pa.int64()),
                "listing_id": [f"L{i:03d}" for i in range(n)],
                "image_uri": [f"/img/{i}.jpg" for i in range(n)],
                "tags": pa.array([[] for _ in range(n)], pa.list_(pa.string())),
            }
        ),
        directory / "ids.parquet",
    )
    (directory / "index.json").write_text(json.dumps({"nprobe": 1, "dim": dim, "count": n, "factory": f"IVF{nlist},Flat"}))
    return x


def test_ivf_with_small_lists_gives_finite_exact_anomaly_scores(tmp_path, capsys):
    from mltag.runtime import log
    from mltag.stages import anomalies, duplicates

    log.configure()  # status lines go to stderr through the mltag logger
    x = _ivf_index_dir(tmp_path / "idx")
    index = faiss.read_index(str(tmp_path / "idx" / "index.faiss"))
    index.nprobe = 1
    _, found = index.search(x, 11)
    assert (found < 0).any()  # the setup really has missing-neighbour placeholders at nprobe 1

    k = 10
    table = anomalies.run(anomalies.AnomalyConfig(index=str(tmp_path / "idx"), out=str(tmp_path / "a.parquet"), k=k, contamination=0.1))
    printed = capsys.readouterr().err
    scores = np.array(table.sort_by("listing_id").column("score").to_pylist())
    assert np.isfinite(scores).all() and scores.max() <= 2.0
    exact = np.sort(1.0 - x @ x.T, axis=1)[:, k]  # brute force: column 0 is the listing itself
    np.testing.assert_allclose(scores, exact, atol=1e-5)
    assert all(len(n) == k for n in table.column("neighbours").to_pylist())
    assert all(min(s) > -1.01 for s in table.column("neighbour_similarities").to_pylist())
    assert "were searched again over every list" in printed

    dupes = duplicates.run(duplicates.DuplicatesConfig(index=str(tmp_path / "idx"), out=str(tmp_path / "d.parquet"), threshold=0.99))
    assert dupes.num_rows == 0  # random directions: no duplicates, and no crash on placeholder ids


def test_an_index_smaller_than_k_reports_the_short_rows(tmp_path, capsys):
    from mltag.runtime import log
    from mltag.stages import anomalies

    log.configure()
    _ivf_index_dir(tmp_path / "idx", n=6, nlist=2)
    table = anomalies.run(anomalies.AnomalyConfig(index=str(tmp_path / "idx"), out=str(tmp_path / "a.parquet"), k=10))
    assert np.isfinite(table.column("score").to_numpy()).all()
    err = capsys.readouterr().err
    assert "W mltag.stages.anomalies: " in err and "6 of 6 listings have fewer than k=10 neighbours" in err  # a warning: scores over fewer


# ---- the report page --------------------------------------------------------------------------------
HOSTILE_TAGS = [
    "<script>document.body.dataset.pwned='1'</script>",
    "<img src=x onerror=\"document.body.dataset.pwned2='1'\">",
    "price $^{$ tag",
    "a&amp;b",
    "plain",
]


@pytest.mark.slow
def test_hostile_tag_names_are_escaped_in_the_rendered_report(tmp_path):
    from mltag.data.vocabulary import Vocabulary
    from mltag.stages import report
    from mltag.stages.evaluate import compute_metrics
    from mltag.tagger.model import Tagger, TaggerSpec, save_tagger

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless browser installed (make test installs chromium where apt-get can)")
    vocab = Vocabulary.from_dict({"tags": HOSTILE_TAGS})
    spec = save_tagger(
        Tagger("test_efficientnet", len(vocab)),
        TaggerSpec(backbone="test_efficientnet", vocabulary=vocab.to_dict(), img_size=32),
        str(tmp_path / "model"),
    )
    rng = np.random.default_rng(0)
    y = (rng.random((60, len(vocab))) < 0.4).astype(np.uint8)
    y[: len(vocab), :] = np.eye(len(vocab), dtype=np.uint8)  # every tag has a positive
    scores = np.clip(y * 0.5 + rng.random(y.shape) * 0.6, 0, 1).astype(np.float32)
    metrics, per_tag = compute_metrics(y, scores, spec)
    metrics["model_version"] = spec.version
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    pq.write_table(per_tag, tmp_path / "eval" / "per_tag.parquet")
    n = len(vocab)
    pq.write_table(
        pa.table(
            {
                "listing_id": [f"L{i}" for i in range(len(y))],
                "labels": pa.FixedSizeListArray.from_arrays(pa.array(y.ravel()), n),
                "scores": pa.FixedSizeListArray.from_arrays(pa.array(scores.ravel(), pa.float32()), n),
            }
        ),
        tmp_path / "eval" / "scores.parquet",
    )
    page = report.run(report.ReportConfig(model=str(tmp_path / "model"), eval=str(tmp_path / "eval"), out=str(tmp_path / "report")))

    html = Path(page).read_text()
    assert "<script>document" not in html and "<img src=x" not in html
    proc = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            Path(page).as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = proc.stdout
    assert 'data-figures="4"' in dom and 'data-figures-rendered="4"' in dom, proc.stderr[
        -2000:
    ]  # the page's own script ran, no extra <img>
    assert "data-pwned" not in dom and "data-pwned2" not in dom  # neither hostile script ran
    # Each name is shown as text in the per-tag table.
    assert "<td>&lt;script&gt;document.body.dataset.pwned='1'&lt;/script&gt;</td>" in dom
    assert "<td>&lt;img src=x onerror=\"document.body.dataset.pwned2='1'\"&gt;</td>" in dom
    assert "<td>a&amp;amp;b</td>" in dom and "<td>price $^{$ tag</td>" in dom


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("run_id", "x/../../../victim", "run_id"),
        ("run_id", "..", "run_id"),
        ("snapshot", "2026/11/23", "snapshot"),
        ("allowed_schemes", "file,s3,ht tp", "allowed_schemes"),
        ("fetch_timeout_s", "0", "fetch_timeout_s"),
    ],
)
def test_tag_configs_refuse_path_escapes_and_bad_policies_before_any_work(field, value, match):
    from mltag.config import config_from_dict
    from mltag.stages.tag import TagConfig

    with pytest.raises(ValueError, match=match):
        config_from_dict(TagConfig, {"manifest": "m.parquet", "model": "model", field: value})


def test_the_tag_table_stores_uris_without_their_query_strings():
    import numpy as np
    import pyarrow as pa

    from mltag.table import tag_table

    batch = pa.table({"listing_id": ["a"], "image_uri": ["https://b.s3.amazonaws.com/a.jpg?X-Amz-Signature=SECRET&X-Amz-Credential=K"]})
    row = tag_table.assemble(batch, np.array([0]), np.zeros((1, 2), np.float32), np.ones((1, 3), np.float32), [[]], "v", [None])
    assert row.column("image_uri").to_pylist() == ["https://b.s3.amazonaws.com/a.jpg"] and "SECRET" not in str(row.to_pylist())
