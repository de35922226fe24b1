"""The paper's application, apart from the library: concept training of a causal LM (``loop.py``, configured by
``config.py`` and the recipes), the concept sets it trains on (``concepts/``), evaluation (``evaluate.py``,
``word_similarity.py``, ``bootstrap.py``), the lambda sweep (``sweep.py``), its outputs (``report.py``,
``checkpoints.py``, ``durable.py``) and the command line (``cli.py``). The library never imports this package."""
