"""The inference worker: one model on one device, tagging batches of images into tag-table rows.

Batch tagging runs a pool of them (``mltag.tagging.pipeline.build_pipeline``: Ray Data's actor
pool); ``mltag serve`` holds one per replica, and chained specialists (``mltag.tagging.chain``)
are more of them. Input rows carry either decoded ``pixels`` (decode_on=cpu) or raw
``image_bytes`` (decode_on=actor, decoded here on the actor's device).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from mltag.data.images import pixels_from_arrow
from mltag.data.staging import StagingBuffers
from mltag.data.uri_policy import FetchPolicy
from mltag.table import tag_table
from mltag.tagger.model import load_tagger, normalise, pick_device


class TaggerActor:
    """Loads the model once, then tags batches: ``__call__(batch) -> rows`` (``tag_table`` columns)."""

    def __init__(
        self,
        model_dir: str,
        use_gpu: bool,
        threads: int,
        threshold: float,
        max_tags: int = 0,
        embedding_dtype: str = "float32",
        compile: bool = False,
        policy: FetchPolicy | None = None,
        chain: str = "",
        pad_to: int = 0,
    ):
        torch.set_num_threads(max(1, threads))
        self.device = pick_device(use_gpu)
        self.model, self.spec = load_tagger(model_dir, self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if compile else self.model
        # A compiled model recompiles for every new batch shape, and batches shrink at a shard's
        # end and by their failed images: padded to ``pad_to`` rows, every call has one shape.
        self.pad_to = pad_to
        self.vocab = self.spec.vocab
        self.names = list(self.vocab.names)
        self.thresholds = np.full(len(self.names), threshold, np.float32) if threshold >= 0 else self.spec.threshold_array()
        self.max_tags, self.embedding_dtype, self.policy = max_tags, embedding_dtype, policy
        self.staging = StagingBuffers(self.device)
        self.chain = None
        if chain:  # specialists run on the rows whose tags trigger them (mltag.tagging.chain)
            from mltag.tagging.chain import SpecialistTaggers, load_chain

            self.chain = SpecialistTaggers(
                load_chain(chain), lambda d: TaggerActor(d, use_gpu, threads, -1.0, 0, embedding_dtype, compile, policy)
            )

    def _pixels(self, batch: pa.Table, ok: np.ndarray, errors: list) -> tuple[torch.Tensor, np.ndarray]:
        if "pixels" in batch.column_names:
            pixels = pixels_from_arrow(batch.column("pixels"), self.spec.img_size)  # a view: no copy yet
            return self.staging.to_device(pixels if len(ok) == len(pixels) else pixels[ok]), ok
        from mltag.data.device_decode import decode_on_device

        data = batch.column("image_bytes").take(pa.array(ok)).to_pylist()
        pixels, failures = decode_on_device(data, self.spec.img_size, self.device, policy=self.policy)
        for k, failure in failures.items():
            errors[ok[k]] = failure
        keep = np.array([k for k in range(len(ok)) if k not in failures], dtype=np.int64)
        return pixels[torch.from_numpy(keep).to(pixels.device)] if len(keep) < len(ok) else pixels, ok[keep]

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        if n < self.pad_to:  # zero images fill the batch; in eval mode rows never mix, so they change nothing
            x = torch.cat([x, x.new_zeros((self.pad_to - n, *x.shape[1:]))]).contiguous(memory_format=torch.channels_last)
        logits, emb = self.forward(x)
        return logits[:n], emb[:n]

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
                logits, emb = self._forward(x)
            scores = torch.sigmoid(logits.float()).cpu().numpy()
            embeddings = emb.float().cpu().numpy()
        chosen = tag_table.chosen_tags(scores, self.thresholds, self.vocab, self.max_tags)
        rows = tag_table.assemble(batch, ok, scores, embeddings, chosen, self.spec.version, errors, self.embedding_dtype, self.names)
        if self.chain is not None:
            from mltag.tagging.chain import SPECIALISTS_COLUMN, specialists_column

            tags = [[self.names[j] for j in np.flatnonzero(row)] for row in chosen]
            host = pixels.cpu().numpy() if ok.size else np.zeros((0, self.spec.img_size, self.spec.img_size, 3), np.uint8)
            column = specialists_column(self.chain.chain, ok, batch.num_rows, tags, scores, self.names, host, self.chain.run)
            rows = rows.append_column(SPECIALISTS_COLUMN, column)
        return rows
