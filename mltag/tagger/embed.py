"""In-process tagging of a few images (no Ray): query images for search, quick checks.

Example:
    >>> vectors, errors = embed_images(["photo.jpg"], "runs/train/model")  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch

from mltag.data.images import load_image
from mltag.tagger.model import load_tagger, normalise


@torch.inference_mode()
def tag_images(uris: list[str], model_dir: str, device: str = "cpu") -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """(scores, embeddings, errors) for each image; failed rows have zero scores and embedding."""
    model, spec = load_tagger(model_dir, device)
    scores = np.zeros((len(uris), len(spec.vocabulary)), np.float32)
    embeddings = np.zeros((len(uris), model.embedding_dim), np.float32)
    errors: list[str | None] = []
    for i, uri in enumerate(uris):
        pixels, error = load_image(uri, spec.img_size)
        errors.append(error)
        if pixels is None:
            continue
        batch = torch.from_numpy(pixels[None].copy())  # a decoded image is a read-only view of Pillow's buffer
        logits, emb = model(normalise(batch.to(device), spec.mean, spec.std))
        scores[i] = torch.sigmoid(logits.float())[0].cpu().numpy()
        embeddings[i] = emb.float()[0].cpu().numpy()
    return scores, embeddings, errors


def embed_images(uris: list[str], model_dir: str, device: str = "cpu") -> tuple[np.ndarray, list[str | None]]:
    _, embeddings, errors = tag_images(uris, model_dir, device)
    return embeddings, errors
