"""One module per ``mltag`` subcommand, each a typed config and ``run(config)`` (the CLI and
``jobs/*.py`` call the same function). A stage calls the layers below it; when it runs another
stage it calls that stage's ``run(config)`` (``demo``, ``oof`` -> ``train``, ``reindex`` -> the
index stages), never its internals. ``curation_report`` is ``curate``'s HTML page.

Modules: ``sample``, ``train``, ``evaluate``, ``calibrate``, ``report``, ``tag``, ``reindex``,
``history``, ``index_build``, ``index_update``, ``index_search``, ``anomalies``, ``duplicates``,
``train_head``, ``apply_head``, ``folds``, ``oof``, ``curate``, ``curation_report``, ``serve``,
``demo``.
"""
