"""The reproduction suite around the method layer: tasks, training loop, run records.

Modules, one job each:

* :mod:`~sparsegrad.suite.assets` — the offline models and data (``make assets``)
* :mod:`~sparsegrad.suite.tasks` — task facts (GLUE, oasst1, offline tasks), loading, split protocol
* :mod:`~sparsegrad.suite.data` — tokenisation, chat rendering with assistant-only labels, batching
* :mod:`~sparsegrad.suite.models` — pretrained / tiny models and tokenizers, head compatibility
* :mod:`~sparsegrad.suite.methods` — the only contact with the method layer (apply, optimise, account)
* :mod:`~sparsegrad.suite.trainer` — the training loop, evaluation, early stopping
* :mod:`~sparsegrad.suite.metrics` — GLUE metrics with scikit-learn / scipy
* :mod:`~sparsegrad.suite.measure` — peak memory per phase, environment description
* :mod:`~sparsegrad.suite.record` — the run record schema, validation and atomic writing
* :mod:`~sparsegrad.suite.tracking` — W&B (offline by default) or nothing
* :mod:`~sparsegrad.suite.runner` — one fine-tuning run end to end (used by ``experiments/finetune.py``)

Nothing here imports Hydra; ``import sparsegrad`` never imports this subpackage.
"""
