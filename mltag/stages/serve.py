"""``mltag serve``: tag one photo and find its look-alikes over HTTP with Ray Serve, chain
specialist models behind the general one, and show a review page.

Launch:
    mltag serve --model runs/train/model --index runs/index [--chain chain.yaml]
    serve deploy serve_config.yaml        # the same application on a running cluster (autoscaling there)

Three deployments, one application (``build_app``, also the ``import_path`` of serve_config.yaml):

  Gateway      the HTTP ingress (FastAPI). Reads the body (size-limited), fetches a URI only
               through the ``FetchPolicy`` batch tagging uses, decodes with ``mltag.data.images``
               (the batch path's decode), searches the FAISS index (memory-mapped), and serves
               the review page, its JSON and thumbnails of indexed listings. Bad input is a 4xx
               JSON ``{"error": code, "message": text}`` naming the problem, never a 500.
  TaggerModel  the general tagger, batched with ``@serve.batch``. It runs batch tagging's own
               inference actor (``mltag.tagging.actor.TaggerActor``: normalisation, forward pass, autocast,
               ``tag_table.chosen_tags``), so a photo gets the scores ``mltag tag`` gives it.
               Autoscales between min and max replicas; takes a GPU share when the cluster has GPUs.
  Specialists  the chain's specialist taggers (``mltag.tagging.chain``), loaded on first use with
               ``@serve.multiplexed`` and batched per model; called only when a trigger fires,
               on the general model's pixels resized to their size, as ``mltag tag --chain`` does.

Endpoints: ``POST /tag``, ``POST /similar``, ``GET /healthz``, ``GET /thumb/{listing_id}``,
``GET /`` (review page), ``GET /anomalies``, ``GET /duplicates`` and their ``/api/...`` JSON.
Ray Serve's own metrics (request counts, latencies, batch sizes, replicas) are on Ray's
Prometheus endpoint with the rest of Ray's.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations (Request,
# int | None) at runtime, through Serve's rewrite of the class's methods.
import asyncio
import io
import json
import logging
import os
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from mltag.config import config_dict, config_from_dict
from mltag.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, decode_image, fetch_bytes
from mltag.data.uri_policy import DEFAULT_SCHEMES, FetchPolicy, redact_text
from mltag.runtime.cluster import GPU_SETTINGS, alive_nodes, cluster_cpus, init_ray, wants_gpu
from mltag.table.row_errors import error_reason
from mltag.tagging.chain import Chain, load_chain, nest, resize_pixels, tag_entries, tag_pixels

logger = logging.getLogger(__name__)

PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "review_page")
PAGES = {"/": "index.html", "/anomalies": "anomalies.html", "/duplicates": "duplicates.html"}
STATIC = {"review.js": "text/javascript; charset=utf-8", "review.css": "text/css; charset=utf-8"}  # nothing else is served
THUMB_PX = 160  # thumbnails: the image squashed to a square, as the model sees it
THUMB_CACHE = 512  # thumbnails kept in memory per Gateway replica
SPECIALISTS_PER_REPLICA = 4  # specialist models a Specialists replica keeps loaded (least recently used go first)
INDEX_CHECK_S = 10.0  # how often a Gateway looks whether the index's CURRENT version moved
JSON_KEYS = {"uri", "listing_id", "k", "embedding"}
# An image's error reason (mltag.table.row_errors) -> the HTTP status it is answered with.
STATUS_OF_REASON = {
    "refused_uri": 403,
    "permission_denied": 403,
    "too_large": 413,
    "too_many_pixels": 413,
    "unsupported_format": 415,
    "timeout": 504,  # the image's server did not answer: not the request's fault
    "fetch_failed": 502,
    "throttled": 502,
}


@dataclass
class ServeConfig:
    """Serve tagging and similar-listing search over HTTP with Ray Serve, with model chaining and a review page."""

    model: str = ""  # trained tagger directory: the general model
    index: str = ""  # FAISS index directory (mltag index --out) for /similar, thumbnails and the review page; empty: none
    chain: str = ""  # chain YAML naming specialist models and the general-model tags that trigger them; empty: none
    anomalies: str = ""  # anomalies Parquet (mltag anomalies --out) listed on the /anomalies page
    duplicates: str = ""  # near-duplicate groups Parquet (mltag duplicates --out) listed on the /duplicates page
    host: str = "127.0.0.1"  # address Serve's HTTP proxy listens on (0.0.0.0: every interface)
    port: int = 8000  # port of Serve's HTTP proxy
    route_prefix: str = "/"  # where the application is mounted
    app_name: str = "mltag"  # Serve application name
    blocking: bool = True  # keep serving until interrupted; false: start, print the address and return
    max_batch_size: int = 16  # images one forward pass may take (@serve.batch); 1 turns batching off
    batch_wait_timeout_s: float = 0.005  # longest a batch waits to fill before it runs
    min_replicas: int = 1  # TaggerModel replicas: autoscaling lower bound
    max_replicas: int = 1  # TaggerModel replicas: autoscaling upper bound (serve_config.yaml sets a cluster's)
    target_ongoing_requests: float = 16.0  # autoscaling target: requests in flight per TaggerModel replica
    max_ongoing_requests: int = 64  # requests one model replica holds at once (at least max_batch_size)
    ingress_replicas: int = 1  # Gateway replicas (HTTP, decode, index search, pages)
    ingress_cpus: float = 0.5  # CPUs reserved per Gateway replica
    model_cpus: float = 1.0  # CPUs reserved per TaggerModel replica
    specialist_cpus: float = 0.25  # CPUs reserved per Specialists replica
    model_gpus: float = 0.5  # GPU share per TaggerModel replica when GPUs are used
    specialist_gpus: float = 0.5  # GPU share per Specialists replica when GPUs are used
    use_gpu: str = "auto"  # auto: model replicas take a GPU share when the cluster has GPUs | true | false
    torch_threads: int = 0  # intra-op threads per model replica; 0: one machine without GPU: its CPUs over max_replicas, else model_cpus
    threshold: float = -1.0  # one threshold for all tags; negative: the model's saved thresholds (as mltag tag)
    max_tags: int = 0  # keep at most this many tags per image, best first; 0: no limit (as mltag tag)
    k: int = 10  # similar listings returned when a request does not say
    max_k: int = 100  # the most similar listings a request may ask for
    max_body_bytes: int = 16 * 2**20  # larger request bodies are refused (413)
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused from their header (413), as in mltag tag
    request_timeout_s: float = 60.0  # Serve's proxy answers 408 past this
    allowed_schemes: str = ",".join(DEFAULT_SCHEMES)  # URI schemes a {"uri": ...} request may name (add http,https for the web)
    allow_private_networks: bool = False  # http(s) only: also loopback, link-local (cloud metadata) and private addresses
    allowed_roots: str = ""  # comma-separated local dirs / URI prefixes a requested URI must lie under; empty: anywhere
    fetch_timeout_s: float = 10.0  # per fetch of a requested URI; past it the answer is 504

    def validate(self) -> None:
        if not self.model:
            raise ValueError("model is required (--model DIR, a trained tagger directory)")
        if self.use_gpu not in GPU_SETTINGS:
            raise ValueError("use_gpu must be auto, true or false")
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ValueError("max_batch_size must be positive and batch_wait_timeout_s not negative")
        if not 0 < self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 < min_replicas <= max_replicas, got {self.min_replicas} and {self.max_replicas}")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least max_batch_size ({self.max_batch_size})")
        if not 1 <= self.k <= self.max_k:
            raise ValueError(f"need 1 <= k <= max_k, got k={self.k}, max_k={self.max_k}")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        if not self.route_prefix.startswith("/"):
            raise ValueError("route_prefix must start with /")
        self.fetch_policy()

    def fetch_policy(self) -> FetchPolicy:
        return FetchPolicy.from_settings(self.allowed_schemes, self.allow_private_networks, self.allowed_roots, self.fetch_timeout_s)


class ApiError(Exception):
    """A request the application refuses: answered as ``{"error": code, "message": text}``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def image_error(exc: Exception) -> ApiError:
    """An image that could not be fetched or decoded, as the 4xx (or 502/504 for the image's
    server) that names why: the same reason codes as the tag table's ``error_reason``."""
    text = str(exc) if isinstance(exc, ImageLoadError) else f"unexpected {type(exc).__name__}: {exc}"
    text = redact_text(text)
    reason = error_reason(text)
    return ApiError(STATUS_OF_REASON.get(reason, 422), reason, text)


# ---- the model replicas --------------------------------------------------------------------------
@serve.deployment(name="TaggerModel")
class TaggerModel:
    """The general tagger; requests are batched (``max_batch_size`` 1: one forward pass a request)."""

    def __init__(self, model_dir: str, use_gpu: bool, threads: int, threshold: float, max_tags: int, max_batch_size: int, wait_s: float):
        from mltag.tagging.actor import TaggerActor

        self.tagger = TaggerActor(model_dir, use_gpu, threads, threshold, max_tags)
        self.tag.set_max_batch_size(max_batch_size)
        self.tag.set_batch_wait_timeout_s(wait_s)
        self.batches = self.images = 0

    def info(self) -> dict:
        return {"pid": os.getpid(), "device": str(self.tagger.device), "batches": self.batches, "images": self.images}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def tag(self, images: list[np.ndarray]) -> list[dict]:
        self.batches, self.images = self.batches + 1, self.images + len(images)
        # In a thread: the replica's event loop keeps collecting the next batch meanwhile.
        return await asyncio.to_thread(tag_pixels, self.tagger, images)


@serve.deployment(name="Specialists")
class Specialists:
    """The chain's specialist taggers, one multiplexed model id per specialist name."""

    def __init__(self, chain_path: str, use_gpu: bool, threads: int, max_batch_size: int, wait_s: float):
        self.chain, self.use_gpu, self.threads = load_chain(chain_path), use_gpu, threads
        self.tag.set_max_batch_size(max_batch_size)
        self.tag.set_batch_wait_timeout_s(wait_s)
        self.loads: Counter = Counter()  # model loads per specialist (a test checks untriggered ones never load)
        self.runs: Counter = Counter()  # images tagged per specialist

    @serve.multiplexed(max_num_models_per_replica=SPECIALISTS_PER_REPLICA)
    async def model(self, name: str):
        from mltag.tagging.actor import TaggerActor

        specialist = self.chain.specialist(name)
        self.loads[name] += 1
        return await asyncio.to_thread(TaggerActor, specialist.model, self.use_gpu, self.threads, -1.0, 0)

    def stats(self) -> dict:
        return {"pid": os.getpid(), "loads": dict(self.loads), "runs": dict(self.runs)}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def tag(self, images: list[np.ndarray]) -> list[dict]:
        name = serve.get_multiplexed_model_id()  # batches never mix models
        tagger = await self.model(name)
        self.runs[name] += len(images)
        # The general model's pixels, resized to this model's input size: what `mltag tag --chain` feeds it.
        return await asyncio.to_thread(lambda: tag_pixels(tagger, resize_pixels(np.stack(images), tagger.spec.img_size)))


# ---- the HTTP ingress ----------------------------------------------------------------------------
api = FastAPI(title="mltag", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    return JSONResponse({"error": codes.get(exc.status_code, "http_error"), "message": str(exc.detail)}, status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    return JSONResponse({"error": "bad_request", "message": problems}, status_code=400)


@dataclass
class Query:
    """What a /tag or /similar request asks about: image bytes, a URI or a listing id."""

    data: bytes | None = None
    uri: str | None = None
    listing_id: str | None = None
    k: int | None = None
    embedding: bool = False


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to pass ``limit`` bytes (from
    Content-Length, or while streaming a chunked body)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ApiError(413, "body_too_large", f"request body is {int(length)} bytes, over the limit of {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "body_too_large", f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_query(request: Request, limit: int) -> Query:
    """Raw image bytes (any content type but JSON and forms), multipart/form-data with one file
    (and optionally listing_id / uri / k fields), or JSON ``{"uri"|"listing_id", "k", "embedding"}``."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, limit)
    if not body:
        raise ApiError(400, "empty_body", "the request has no body: send image bytes, a multipart form with a file, or JSON")
    if content_type == "application/json":
        try:
            values = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
        if not isinstance(values, dict):
            raise ApiError(400, "bad_json", 'the JSON body must be an object such as {"listing_id": "L1"} or {"uri": "s3://..."}')
        unknown = sorted(set(values) - JSON_KEYS)
        if unknown:
            raise ApiError(400, "bad_request", f"unknown key(s) {unknown}; valid keys: {sorted(JSON_KEYS)}")
        return _query_from_fields(values.get("uri"), values.get("listing_id"), values.get("k"), values.get("embedding", False))
    if content_type == "multipart/form-data":
        from starlette.requests import Request as StarletteRequest

        async def replay() -> dict:  # the body was already read (and limited): parse it from memory
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await StarletteRequest(request.scope, replay).form(max_files=1, max_fields=8)
        except Exception as exc:  # malformed multipart, too many parts
            raise ApiError(400, "bad_form", f"cannot read the multipart form: {exc}") from None
        files = [v for v in form.values() if hasattr(v, "read")]
        data = await files[0].read() if files else None
        query = _query_from_fields(
            form.get("uri"), form.get("listing_id"), form.get("k"), form.get("embedding", False), allow_none=data is not None
        )
        query.data = data
        if data is not None and (query.uri or query.listing_id):
            raise ApiError(400, "bad_request", "send a file, a uri or a listing_id, not several")
        if data is not None and not data:
            raise ApiError(400, "empty_body", "the uploaded file is empty")
        return query
    if content_type == "application/x-www-form-urlencoded":
        raise ApiError(415, "unsupported_media_type", "send image bytes, multipart/form-data with a file, or application/json")
    return Query(data=body)


def _query_from_fields(uri, listing_id, k, embedding, allow_none: bool = False) -> Query:
    given = [name for name, value in (("uri", uri), ("listing_id", listing_id)) if value not in (None, "")]
    if len(given) > 1:
        raise ApiError(400, "bad_request", "give either uri or listing_id, not both")
    if not given and not allow_none:
        raise ApiError(400, "bad_request", "nothing to look at: send image bytes, a file, or JSON with uri or listing_id")
    for name, value in (("uri", uri), ("listing_id", listing_id)):
        if value not in (None, "") and not isinstance(value, str):
            raise ApiError(400, "bad_request", f"{name} must be a string")
    if k not in (None, ""):
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise ApiError(400, "bad_request", f"k must be an integer, got {k!r}") from None
    if isinstance(embedding, str):
        embedding = embedding.lower() in ("1", "true", "yes", "on")
    return Query(uri=uri or None, listing_id=listing_id or None, k=k if k not in (None, "") else None, embedding=bool(embedding))


# Defined before Gateway: Serve serialises the ingress class (by value) when it is decorated.
def _jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=85)
    return out.getvalue()


def _page(route: str) -> HTMLResponse:
    with open(os.path.join(PAGE_DIR, PAGES[route]), encoding="utf-8") as f:
        html = f.read()
    # The page runs only its own script and shows only this server's images.
    csp = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'"
    return HTMLResponse(html, headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"})


@serve.deployment(name="Gateway")
@serve.ingress(api)
class Gateway:
    def __init__(self, tagger, specialists, settings: dict):
        from mltag.tagger.spec import load_spec

        self.config = config_from_dict(ServeConfig, settings)
        self.policy = self.config.fetch_policy()
        self.tagger, self.specialists = tagger, specialists
        self.spec = load_spec(self.config.model)
        self.names = list(self.spec.vocab.names)
        self.chain = load_chain(self.config.chain) if self.config.chain else Chain()
        self.specialist_specs = {s.name: load_spec(s.model) for s in self.chain.specialists}
        self.index = self.index_version = None
        self.index_checked = 0.0
        self._load_index()
        self.thumbs: OrderedDict[str, bytes] = OrderedDict()
        self.tables: dict[str, tuple[float, object]] = {}

    # -- the index ------------------------------------------------------------------------------
    def _load_index(self) -> None:
        if not self.config.index:
            return
        from mltag.search import EmbeddingIndex, current_version_dir

        version_dir = current_version_dir(self.config.index)
        self.index = EmbeddingIndex.load(version_dir, mmap=True)
        self.index_version = os.path.basename(version_dir)
        self.index_checked = time.monotonic()

    def _current_index(self):
        """The index, reloaded when its CURRENT pointer moved (checked every INDEX_CHECK_S)."""
        if self.index is not None and time.monotonic() - self.index_checked > INDEX_CHECK_S:
            from mltag.search import current_version_dir

            self.index_checked = time.monotonic()
            if os.path.basename(current_version_dir(self.config.index)) != self.index_version:
                self._load_index()
        if self.index is None:
            raise ApiError(404, "no_index", "this server was started without --index: no similar listings, thumbnails or listing ids")
        return self.index

    def _index_info(self) -> dict | None:
        if self.index is None:
            return None
        meta = self.index.meta
        return {
            "version": self.index_version,
            "count": len(self.index),
            "model_version": meta.get("model_version"),
            "table_version": meta.get("table_version"),
            "factory": meta.get("factory"),
        }

    def _listing_uri(self, listing_id: str) -> str:
        uri = self._current_index().image_uri_of(listing_id)
        if uri is None:
            raise ApiError(404, "unknown_listing", f"listing {listing_id!r} is not in the index ({self.index_version})")
        return uri

    # -- images ---------------------------------------------------------------------------------
    async def _fetch(self, uri: str) -> bytes:
        try:
            return await asyncio.to_thread(fetch_bytes, uri, self.config.max_body_bytes, 1, policy=self.policy)
        except Exception as exc:
            raise image_error(exc) from None

    async def _image_bytes(self, query: Query) -> bytes:
        if query.data is not None:
            return query.data
        if query.listing_id is not None:
            return await self._fetch(self._listing_uri(query.listing_id))
        return await self._fetch(query.uri)

    async def _decode(self, data: bytes, size: int) -> np.ndarray:
        try:
            return await asyncio.to_thread(decode_image, data, size, self.config.max_pixels, policy=self.policy)
        except Exception as exc:
            raise image_error(exc) from None

    async def _call(self, response, what: str):
        try:
            return await response
        except Exception as exc:  # a replica died or was restarted mid-request
            raise ApiError(
                503, "model_unavailable", f"{what} could not answer: {type(exc).__name__}: {redact_text(str(exc))[:300]}"
            ) from None

    async def _tag(self, data: bytes) -> dict:
        """Decode once, tag with the general model, then the specialists its tags trigger (on the
        same pixels); returns the /tag response body (without latency)."""
        pixels = await self._decode(data, self.spec.img_size)
        general = await self._call(self.tagger.tag.remote(pixels), "the tagger")
        scores = {n: float(s) for n, s in zip(self.names, general["scores"])}
        entries = tag_entries(self.names, general["scores"], general["tags"])
        fired = self.chain.triggered(general["tags"], scores)
        results, versions = {}, {"general": general["model_version"]}
        calls = {}
        for name in fired:
            calls[name] = self.specialists.options(multiplexed_model_id=name).tag.remote(pixels)
        for name, call in calls.items():
            out = await self._call(call, f"specialist {name!r}")
            names = list(self.specialist_specs[name].vocab.names)
            results[name] = {"model_version": out["model_version"], "tags": tag_entries(names, out["scores"], out["tags"])}
            versions[name] = out["model_version"]
        return {
            "model_version": general["model_version"],
            "model_versions": versions,
            "tags": nest(entries, fired, results),
            "scores": scores,
            "batch_size": general["batch_size"],
            "_embedding": general["embedding"],
        }

    # -- endpoints ------------------------------------------------------------------------------
    @api.post("/tag")
    async def tag(self, request: Request, embedding: bool = False):
        started = time.perf_counter()
        query = await parse_query(request, self.config.max_body_bytes)
        result = await self._tag(await self._image_bytes(query))
        vector = result.pop("_embedding")
        if embedding or query.embedding:
            result["embedding"] = [float(v) for v in vector]
        if query.listing_id is not None:
            result["listing_id"] = query.listing_id
        result["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return result

    @api.post("/similar")
    async def similar(self, request: Request, k: int | None = None):
        started = time.perf_counter()
        query = await parse_query(request, self.config.max_body_bytes)
        k = query.k if query.k is not None else k if k is not None else self.config.k
        if not 1 <= k <= self.config.max_k:
            raise ApiError(400, "bad_request", f"k must be between 1 and {self.config.max_k}, got {k}")
        index = self._current_index()
        body: dict = {"index": self._index_info(), "k": k}
        if query.listing_id is not None:
            try:
                vector = index.vector_of(query.listing_id)
            except KeyError:
                raise ApiError(404, "unknown_listing", f"listing {query.listing_id!r} is not in the index ({self.index_version})") from None
            body["query"] = {"listing_id": query.listing_id}
        else:
            if index.meta.get("model_version") != self.spec.version:
                raise ApiError(
                    409,
                    "index_model_mismatch",
                    f"the index holds embeddings of model {index.meta.get('model_version')}, this server tags with "
                    f"{self.spec.version}: an image cannot be compared with them (query by listing_id, or rebuild the index)",
                )
            tagged = await self._tag(await self._image_bytes(query))
            vector = np.asarray(tagged.pop("_embedding"), np.float32)[None, :]
            body["query"] = {"uri": query.uri} if query.uri else {"image": True}
            body["query"]["tags"] = tagged["tags"]
        table = (await asyncio.to_thread(index.search_vectors, vector, k))[0]
        body["neighbours"] = [
            {
                "rank": int(row["rank"]),
                "listing_id": row["listing_id"],
                "similarity": float(row["similarity"]),
                "tags": row["tags"] or [],
                "thumbnail": f"thumb/{row['listing_id']}",
            }
            for row in table.select(["rank", "listing_id", "similarity", "tags"]).to_pylist()
        ]
        body["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return body

    @api.get("/healthz")
    async def healthz(self):
        return {
            "status": "ok",
            "pid": os.getpid(),
            "model_version": self.spec.version,
            "img_size": self.spec.img_size,
            "tags": len(self.names),
            "specialists": {name: s.version for name, s in self.specialist_specs.items()},
            "index": self._index_info(),
            "pages": {"anomalies": bool(self.config.anomalies), "duplicates": bool(self.config.duplicates)},
            "max_body_bytes": self.config.max_body_bytes,
            "k": self.config.k,
        }

    @api.get("/thumb/{listing_id}")
    async def thumb(self, listing_id: str):
        """A small JPEG of an indexed listing's image: only listing ids in the index, never a path."""
        if listing_id not in self.thumbs:
            pixels = await self._decode(await self._fetch(self._listing_uri(listing_id)), THUMB_PX)
            self.thumbs[listing_id] = await asyncio.to_thread(_jpeg, pixels)
            while len(self.thumbs) > THUMB_CACHE:
                self.thumbs.popitem(last=False)
        self.thumbs.move_to_end(listing_id)
        return Response(self.thumbs[listing_id], media_type="image/jpeg", headers={"Cache-Control": "max-age=300"})

    # -- the review page --------------------------------------------------------------------------
    @api.get("/")
    async def page_index(self):
        return _page("/")

    @api.get("/anomalies")
    async def page_anomalies(self):
        return _page("/anomalies")

    @api.get("/duplicates")
    async def page_duplicates(self):
        return _page("/duplicates")

    @api.get("/static/{name}")
    async def static(self, name: str):
        if name not in STATIC:
            raise ApiError(404, "not_found", f"no static file {name!r}")
        with open(os.path.join(PAGE_DIR, name), "rb") as f:
            return Response(f.read(), media_type=STATIC[name])

    def _parquet(self, path: str):
        """A Parquet output, re-read when its file changes."""
        import pyarrow.parquet as pq

        mtime = os.path.getmtime(path)
        cached = self.tables.get(path)
        if cached is None or cached[0] != mtime:
            self.tables[path] = (mtime, pq.read_table(path))
        return self.tables[path][1]

    def _thumb_of(self, listing_id: str) -> str | None:
        """A thumbnail link for listings the index holds; None for any other."""
        return f"thumb/{listing_id}" if self.index is not None and self.index.image_uri_of(listing_id) is not None else None

    @api.get("/api/anomalies")
    async def api_anomalies(self, limit: int = 50):
        if not self.config.anomalies:
            raise ApiError(404, "no_anomalies", "this server was started without --anomalies (a Parquet file from mltag anomalies)")
        limit = max(1, min(limit, 1000))
        table = self._parquet(self.config.anomalies).sort_by("rank").slice(0, limit)
        rows = table.select(["rank", "listing_id", "score", "is_outlier"]).to_pylist()
        for row in rows:
            row["thumbnail"] = self._thumb_of(row["listing_id"])
            row["score"] = float(row["score"])
        return {"source": os.path.basename(self.config.anomalies), "rows": rows}

    @api.get("/api/duplicates")
    async def api_duplicates(self, limit: int = 50):
        if not self.config.duplicates:
            raise ApiError(404, "no_duplicates", "this server was started without --duplicates (a Parquet file from mltag duplicates)")
        limit = max(1, min(limit, 1000))
        table = self._parquet(self.config.duplicates)
        groups: dict[int, list] = {}
        for row in table.select(["group_id", "listing_id", "max_similarity"]).to_pylist():
            if row["group_id"] in groups or len(groups) < limit:
                groups.setdefault(row["group_id"], []).append(
                    {
                        "listing_id": row["listing_id"],
                        "max_similarity": float(row["max_similarity"]),
                        "thumbnail": self._thumb_of(row["listing_id"]),
                    }
                )
        return {"source": os.path.basename(self.config.duplicates), "groups": [{"group_id": g, "members": m} for g, m in groups.items()]}


# ---- building and running the application -----------------------------------------------------------
def _threads(config: ServeConfig, use_gpu: bool) -> int:
    if config.torch_threads > 0:
        return config.torch_threads
    if use_gpu or alive_nodes() > 1:
        return max(1, round(config.model_cpus))
    # One machine, no GPU: the forward pass is the bound, its replicas share the node's cores.
    return max(1, cluster_cpus() // config.max_replicas)


def build_app(args: dict):
    """The Serve application for ``args`` (ServeConfig keys): ``mltag serve`` calls it, and
    ``serve deploy serve_config.yaml`` imports it (``import_path: mltag.stages.serve:build_app``)."""
    from mltag.tagger.spec import load_spec

    config = args if isinstance(args, ServeConfig) else config_from_dict(ServeConfig, dict(args or {}))
    spec = load_spec(config.model)  # a missing model stops here, before any replica starts
    chain = load_chain(config.chain) if config.chain else Chain()
    chain.check_vocabulary(spec.vocab.names)
    for specialist in chain.specialists:
        load_spec(specialist.model)
    if config.index:
        from mltag.search import current_version_dir

        current_version_dir(config.index)
    for path in (config.anomalies, config.duplicates):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"no such Parquet file: {path}")
    use_gpu = wants_gpu(config.use_gpu)
    threads = _threads(config, use_gpu)
    settings = config_dict(config)
    settings.update(
        {
            k: os.path.abspath(v)
            for k, v in settings.items()
            if k in ("model", "index", "chain", "anomalies", "duplicates") and v and "://" not in v
        }
    )
    tagger = TaggerModel.options(
        ray_actor_options={"num_cpus": config.model_cpus, "num_gpus": config.model_gpus if use_gpu else 0},
        autoscaling_config={
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
        },
        max_ongoing_requests=config.max_ongoing_requests,
    ).bind(settings["model"], use_gpu, threads, config.threshold, config.max_tags, config.max_batch_size, config.batch_wait_timeout_s)
    specialists = None
    if len(chain):
        specialists = Specialists.options(
            ray_actor_options={"num_cpus": config.specialist_cpus, "num_gpus": config.specialist_gpus if use_gpu else 0},
            max_ongoing_requests=config.max_ongoing_requests,
        ).bind(settings["chain"], use_gpu, threads, config.max_batch_size, config.batch_wait_timeout_s)
    return Gateway.options(
        num_replicas=config.ingress_replicas,
        ray_actor_options={"num_cpus": config.ingress_cpus},
        max_ongoing_requests=max(256, config.max_ongoing_requests * config.max_replicas),
    ).bind(tagger, specialists, settings)


def run(config: ServeConfig) -> str:
    """Starts the application on the current Ray cluster (a local one by default); returns its
    URL. With ``blocking`` it serves until interrupted, then shuts Serve down."""
    from mltag.tagger.spec import load_spec

    load_spec(config.model)  # a wrong --model stops here, before Ray starts
    init_ray()
    app = build_app(config)
    serve.start(http_options={"host": config.host, "port": config.port, "request_timeout_s": config.request_timeout_s})
    serve.run(app, name=config.app_name, route_prefix=config.route_prefix, blocking=False)
    url = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}/"
    logger.info(f"mltag serve: {url} (review page), POST {url}tag, POST {url}similar, GET {url}healthz")
    if not config.blocking:
        return url
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("mltag serve: shutting down")
        serve.shutdown()
    return url
