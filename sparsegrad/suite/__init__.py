"""The reproduction suite around the method layer, one subpackage per job:

* :mod:`sparsegrad.suite.run` — one fine-tuning run: settings, tasks and data, models, the training loop,
  measuring, the run record;
* :mod:`sparsegrad.suite.sweep` — the sweep: profiles, studies, the driver, its progress and records folder;
* :mod:`sparsegrad.suite.report` — tables, findings and their statistics, figures (pure functions of records);
* :mod:`sparsegrad.suite.errors` — the one-line user errors every job raises.

It depends on the method layer, never the other way round. Nothing here imports Hydra; ``import
sparsegrad`` never imports this subpackage.
"""
