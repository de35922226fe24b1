"""Fixtures shared by the training tests."""
import pytest


@pytest.fixture
def no_slow_work(monkeypatch):
    """Loading a model or building concept sets fails the test: validation must come first."""
    from fused_concept.integrations import hf
    from fused_concept.training import loop, run

    def refuse(*args, **kwargs):
        raise AssertionError("slow work started before the options were checked")

    for module, name in ((hf, "load_default_model"), (hf, "load_model"), (loop, "setup_data"), (run, "setup_data"),
                         (run, "concept_sets")):
        monkeypatch.setattr(module, name, refuse)
