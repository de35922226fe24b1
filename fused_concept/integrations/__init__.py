"""Integrations with training stacks: ``hf`` (Hugging Face transformers: ``patch``, the Trainer, model loading)."""
