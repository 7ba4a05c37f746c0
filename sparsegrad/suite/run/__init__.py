"""One fine-tuning run: its settings, task and data, model, method, training loop, measurements and record.

* :mod:`~sparsegrad.suite.run.settings` — the config check (pydantic) and the plain settings of a run
* :mod:`~sparsegrad.suite.run.assets` — the offline models and data (``make assets``)
* :mod:`~sparsegrad.suite.run.tasks` — task facts (GLUE, oasst1, offline tasks), loading, split protocol
* :mod:`~sparsegrad.suite.run.data` — tokenisation, chat rendering with assistant-only labels, batching
* :mod:`~sparsegrad.suite.run.models` — pretrained / tiny models and tokenizers (``tiny_tokenizers``), heads
* :mod:`~sparsegrad.suite.run.methods` — the only contact with the method layer (apply, optimise, account)
* :mod:`~sparsegrad.suite.run.trainer` — the training loop, evaluation, early stopping (``convergence``)
* :mod:`~sparsegrad.suite.run.metrics` — GLUE metrics with scikit-learn / scipy
* :mod:`~sparsegrad.suite.run.measure` — peak memory per phase, environment description
* :mod:`~sparsegrad.suite.run.record` — the run record schema, validation and atomic writing
* :mod:`~sparsegrad.suite.run.tracking` — W&B (offline by default) or nothing
* :mod:`~sparsegrad.suite.run.runner` — one fine-tuning run end to end (``experiments/finetune.py``)
* :mod:`~sparsegrad.suite.run.sparsity` — the gradient-sparsity analysis (Figure 2)
"""
