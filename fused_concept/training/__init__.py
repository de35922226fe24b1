"""The paper's application, apart from the library: concept training of a causal LM.

``config.py`` (every setting and its rule) and ``recipes/`` (named settings as TOML files: the paper's),
``run.py`` (setting up a run: process group, device, model, data, LoRA, optimizer), ``loop.py`` (the job
and the training loop), ``checkpoints.py`` (resume and adapters), ``metrics.py`` (the registry of every
reported number), ``evaluate.py`` (held-out evaluation and the ``eval`` command), ``word_similarity.py``,
``bootstrap.py``, ``sweep.py`` (the lambda ablation), ``report.py`` (what a run prints and writes),
``durable.py`` (crash-safe files), ``data.py`` (corpora), ``concepts/`` (the concept sets it trains on) and
``cli.py`` (the command line). The library never imports this package."""
