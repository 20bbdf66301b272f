"""The tagging pipeline on Ray Data: manifest rows -> bytes -> pixels (CPU tasks) -> tagger actors
-> shard files beside the table.

``TagConfig`` holds every setting of it (``mltag tag`` uses it as is; ``reindex``, ``predict``
and the benchmarks build one). The inference worker, ``mltag.tagging.actor.TaggerActor``, is
imported only in the actors that run it (``PooledTaggerActor``): this module stays free of torch
and timm, so a driver that plans and commits a run (or prints ``--help``) does not pay for them.
``build_pipeline`` chains the stages; ``tag_shards`` runs the unfinished shards of a run
(``mltag.table.sharded_run``) through it. Committing is ``mltag.tagging.commits``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import pyarrow as pa

from mltag.data import catalog, storage
from mltag.data.fingerprints import FINGERPRINTS
from mltag.data.identifiers import validate_identifier
from mltag.data.images import DEFAULT_MAX_PIXELS, decode_batch, fetch_batch
from mltag.data.uri_policy import DEFAULT_SCHEMES, FetchPolicy
from mltag.runtime.cluster import GPU_SETTINGS, cluster_cpus, cluster_gpus, dataset_from_tables, init_ray, wants_gpu
from mltag.table import tag_table
from mltag.table.sharded_run import Plan, ShardedRun, Totals, read_shard_manifests, write_shard_files
from mltag.tagger.spec import load_spec

logger = logging.getLogger(__name__)

IO_STAGE_CPUS = 0.25  # CPU share of a manifest-read or file-write task
DECODE_BATCHES_PER_TASK = (
    4  # manifest rows per decode task, in decode batches: small enough to stream, large enough that task overhead stays small
)


@dataclass
class TagConfig:
    """Tag every image of a catalog manifest into the Delta tag table (one commit per run)."""

    manifest: str = ""  # catalog manifest (Parquet/CSV, a directory or a glob; local or s3)
    model: str = ""  # trained tagger directory (weights.pt + tagger.json)
    out: str = "runs/tag_table"  # Delta tag table (local or s3://); a run replaces its content in one commit
    snapshot: str = ""  # label recorded with the commit (e.g. the catalog date 2026-11-23): --as-of finds it
    run_id: str = ""  # names the run; empty: derived from the inputs, so the same command resumes its own run
    retry_errors: bool = False  # re-tag only the error rows of the table's current version (one MERGE commit)
    max_error_rate: float = 0.1  # a run with a larger share of error rows is not committed (exit 1)
    shard_rows: int = 50_000  # rows per shard: the unit of resume after a crash
    rows_per_file: int = 50_000  # at most this many rows per data file
    batch_size: int = 64  # images per inference call
    decode_batch_size: int = 32  # images per CPU decode task
    decode_cpus: float = 0.5  # logical CPUs per decode task: two per free core, so one waiting on I/O leaves the core to the other
    num_actors: int = 0  # inference actors; 0: one per GPU, or one per 2 CPUs on CPU-only clusters
    cpus_per_actor: int = 1  # CPUs reserved per inference actor
    torch_threads: int = 0  # intra-op threads per actor; 0: cpus_per_actor on GPU, the node's CPU share on CPU-only clusters
    use_gpu: str = "auto"  # auto | true | false
    threshold: float = -1.0  # one threshold for all tags; negative: the model's saved thresholds
    max_tags: int = 0  # keep at most this many tags per image (best scores first); 0: no limit
    embedding_dtype: str = "float32"  # float32 (the only type Delta Lake stores; kept for forward compatibility)
    decode_on: str = "cpu"  # cpu: Pillow in CPU tasks | actor: JPEG decode on the actor's device (nvJPEG on GPU)
    compile: bool = False  # torch.compile the model in each actor (pays off on long GPU runs)
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused (decompression bombs)
    fingerprint: str = "stat"  # recorded per row for the nightly re-index: stat (size/mtime/ETag) | hash (sha256) | none
    allowed_schemes: str = ",".join(DEFAULT_SCHEMES)  # image URI schemes that may be fetched (add http,https to fetch from the web)
    allow_private_networks: bool = False  # http(s) only: also loopback, link-local (cloud metadata) and private addresses
    allowed_roots: str = ""  # comma-separated local dirs / URI prefixes images must lie under; empty: anywhere
    fetch_timeout_s: float = 30.0  # per image fetch attempt; past it the row is a transient "timeout:" error
    chain: str = ""  # chain YAML (mltag.tagging.chain): specialist models the model's tags trigger, recorded in a specialists column

    def validate(self) -> None:
        if not self.model:
            raise ValueError("model is required (--model DIR, a trained tagger directory)")
        if self.chain:
            from mltag.tagging.chain import load_chain

            load_chain(self.chain)  # a bad chain file stops here
        if not self.manifest and not self.retry_errors:
            raise ValueError("manifest is required (--manifest PATH)")
        if self.use_gpu not in GPU_SETTINGS:
            raise ValueError("use_gpu must be auto, true or false")
        if self.batch_size < 1 or self.decode_batch_size < 1 or self.shard_rows < 1 or self.rows_per_file < 1:
            raise ValueError("batch sizes, shard_rows and rows_per_file must be positive")
        if self.embedding_dtype not in tag_table.EMBEDDING_DTYPES:
            raise ValueError(
                f"embedding_dtype must be one of: {', '.join(tag_table.EMBEDDING_DTYPES)} (Delta Lake has no half-precision type)"
            )
        if self.decode_on not in ("cpu", "actor"):
            raise ValueError("decode_on must be cpu or actor")
        if not 0 < self.decode_cpus or self.decode_cpus == self.cpus_per_actor:
            # Equal resources would let Ray Data fuse decode into the actor: one process would then
            # decode while the model waits and run the model while nothing decodes.
            raise ValueError(f"decode_cpus must be positive and differ from cpus_per_actor ({self.cpus_per_actor}); got {self.decode_cpus}")
        if self.fingerprint not in FINGERPRINTS + ("none",):
            raise ValueError(f"unknown fingerprint {self.fingerprint!r}; choose one of: {', '.join(FINGERPRINTS + ('none',))}")
        if not 0 <= self.max_error_rate <= 1:
            raise ValueError("max_error_rate must be in [0, 1]")
        if self.run_id:
            validate_identifier("run_id", self.run_id)
        if self.snapshot:
            validate_identifier("snapshot", self.snapshot)
        self.fetch_policy()  # a bad scheme or timeout stops here

    def fetch_policy(self) -> FetchPolicy:
        return FetchPolicy.from_settings(self.allowed_schemes, self.allow_private_networks, self.allowed_roots, self.fetch_timeout_s)

    def result_fields(self) -> dict:
        """The settings that change the rows a run writes (not how fast it writes them)."""
        keep = (
            "threshold",
            "max_tags",
            "embedding_dtype",
            "decode_on",
            "max_pixels",
            "allowed_schemes",
            "allow_private_networks",
            "allowed_roots",
            "fingerprint",
            "chain",
        )
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k in keep}
        if self.chain:  # the chain file's content and its models' versions, not only its path
            from mltag.tagging.chain import chain_signature

            fields["chain"] = chain_signature(self.chain)
        else:  # no chain: the fields (so the derived run ids) as they were before chains existed
            fields.pop("chain")
        return fields


def _resources(config: TagConfig) -> tuple[int, bool]:
    use_gpu = wants_gpu(config.use_gpu)
    if config.num_actors > 0:
        return config.num_actors, use_gpu
    if use_gpu:
        return max(1, cluster_gpus()), True
    # Leave half the CPUs to the decode tasks that feed the actors.
    return max(1, cluster_cpus() // (2 * config.cpus_per_actor)), False


def _torch_threads(config: TagConfig, num_actors: int, use_gpu: bool) -> int:
    """On CPU the forward pass is the bottleneck (decoding a listing photo is ~10x cheaper): each
    actor's threads get the whole CPU share of its actor, the decode tasks squeeze in between."""
    if config.torch_threads > 0:
        return config.torch_threads
    if use_gpu:
        return config.cpus_per_actor
    return max(config.cpus_per_actor, cluster_cpus() // max(1, num_actors))


def build_pipeline(config: TagConfig, source):
    """The Ray Data chain: fetch + decode (CPU tasks) -> tag (actor pool). ``source`` is a Ray
    Dataset of manifest rows, or a manifest table."""
    import ray.data

    spec = load_spec(config.model)
    num_actors, use_gpu = _resources(config)
    threads = _torch_threads(config, num_actors, use_gpu)
    policy = config.fetch_policy()
    if isinstance(source, pa.Table):
        ds = dataset_from_tables(catalog.chunk_table(source, config.decode_batch_size))
    else:
        # Manifest blocks are large (a whole 50k-row shard, or a file's row group) and a map task
        # takes one block: cut them to a few decode batches each (a streaming repartition, no barrier),
        # so a shard is decoded by many tasks at once and each decoded batch reaches the actors
        # as soon as it is ready, not when the whole block is.
        ds = source.repartition(target_num_rows_per_block=DECODE_BATCHES_PER_TASK * config.decode_batch_size)
    # Decode tasks ask for other resources than the actors on purpose: Ray Data fuses adjacent maps
    # whose resources are equal, and a fused decode would run in the actor, in turn with the model.
    if config.decode_on == "actor":
        ds = ds.map_batches(
            fetch_batch,
            fn_kwargs={"max_pixels": config.max_pixels, "policy": policy},
            num_cpus=config.decode_cpus,
            batch_format="pyarrow",
            batch_size=config.decode_batch_size,
            udf_modifying_row_count=False,
        )
    else:
        ds = ds.map_batches(
            decode_batch,
            fn_kwargs={"size": spec.img_size, "max_pixels": config.max_pixels, "policy": policy},
            num_cpus=config.decode_cpus,
            batch_format="pyarrow",
            batch_size=config.decode_batch_size,
            udf_modifying_row_count=False,
        )
    return ds.map_batches(
        PooledTaggerActor,
        fn_constructor_kwargs={
            "model_dir": config.model,
            "use_gpu": use_gpu,
            "threads": threads,
            "threshold": config.threshold,
            "max_tags": config.max_tags,
            "embedding_dtype": config.embedding_dtype,
            "compile": config.compile,
            "policy": policy,
            "chain": storage.absolute(config.chain) if config.chain else "",
            "pad_to": config.batch_size if config.compile else 0,
        },
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=config.batch_size,
        batch_format="pyarrow",
        num_gpus=1 if use_gpu else 0,
        num_cpus=config.cpus_per_actor,
        udf_modifying_row_count=False,
    )


class PooledTaggerActor:
    """The actor pool's class: a ``mltag.tagging.actor.TaggerActor`` built in the worker. The
    driver hands Ray Data this class rather than TaggerActor itself so that planning and
    committing a run never import torch and timm there (~6 s of a core per job, taken from the
    workers starting beside it on a small machine; on a cluster the head needs neither)."""

    def __init__(self, **kwargs):
        from mltag.tagging.actor import TaggerActor

        self.tagger = TaggerActor(**kwargs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.tagger(batch)


def physical_plan(ds) -> str:
    """The optimised physical plan Ray Data will run (``Dataset.explain``'s last section): one
    line per operator, fused maps joined by ``->``."""
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        ds.explain()
    return text.getvalue().rsplit("-------- Physical Plan (Optimized) --------", 1)[-1].strip()


def tag_shards(
    config: TagConfig, run: ShardedRun, manifest, data_prefix: str, rows: int | None = None, plan: Plan | None = None
) -> tuple[Plan, Totals, int]:
    """Tags every unfinished shard of ``run`` into files under the table, marking shards done as
    they finish. ``manifest`` is a Ray Dataset (or a small table) of normalised rows; ``plan`` an
    already prepared one. Returns (plan, totals over all shards, shards already done before this call)."""
    import ray.data

    init_ray()
    plan = plan or run.prepare(manifest, config.shard_rows, rows)
    todo = run.unfinished_manifests(plan)
    resumed = plan.n_shards - len(todo)
    if resumed:
        logger.info(f"resuming run {run.run_id}: {resumed} of {plan.n_shards} shards already done, tagging {len(todo)}")
    if todo:
        paths = [run.shard_manifest(s) for s in todo]
        # Reading shard manifests and writing Parquet are light I/O stages: a small CPU share each,
        # so on a small node they never wait behind the decode and inference work for a whole CPU
        # (a writer starved until the end would finish every shard at once, and a crash would lose them all).
        # One block per shard: a map stage emits its output when an input block is done, so shards
        # finish one after another. (read_parquet would merge small shard files into one block, and
        # every shard would finish at the very end: a crash would lose them all.)
        source = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths)).map_batches(
            read_shard_manifests, batch_size=1, batch_format="pyarrow", num_cpus=IO_STAGE_CPUS, udf_modifying_row_count=True
        )
        records = build_pipeline(config, source).map_batches(
            write_shard_files,
            fn_kwargs={"table_uri": run.table_uri, "data_prefix": data_prefix, "run_id": run.run_id},
            batch_format="pyarrow",
            batch_size=min(config.rows_per_file, config.shard_rows),
            udf_modifying_row_count=True,
            num_cpus=IO_STAGE_CPUS,
        )
        # Ray Data logs the optimised plan itself when the run starts ("Execution plan of Dataset"):
        # not repeated here.
        finished = [resumed]

        def progress() -> None:
            finished[0] += 1
            if finished[0] == plan.n_shards or finished[0] % max(1, plan.n_shards // 10) == 0:
                logger.info(f"shards done: {finished[0]}/{plan.n_shards}")

        run.collect(records.iter_batches(batch_format="pyarrow", batch_size=None), plan, progress)
    return plan, run.totals(plan), resumed


def __getattr__(name: str):
    # ``from mltag.tagging.pipeline import TaggerActor`` (its home before mltag.tagging.actor) keeps working.
    if name == "TaggerActor":
        from mltag.tagging.actor import TaggerActor

        return TaggerActor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
