"""The model and how it learns: the timm tagger and its saved directory, starting weights, losses,
a training run's state and the loop each Ray Train worker runs, linear heads on stored
embeddings, and in-process scoring of a few images.

Modules: ``model``, ``weights``, ``losses``, ``train_state``, ``train_loop``, ``linear_probe``, ``heads``, ``embed``.
"""
