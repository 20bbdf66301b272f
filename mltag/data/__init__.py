"""The inputs: the catalog manifest, fetching and decoding images, moving pixels to the model,
training augmentation, the vocabulary, and where bytes live (local or S3).

Modules: ``catalog``, ``images``, ``device_decode``, ``staging``, ``augment``, ``storage``, ``identifiers``, ``uri_policy``, ``fingerprints``, ``vocabulary``, ``wordnet``.
"""
