"""Tiny training jobs: a random-weight Llama, hand-made token data with concept sets, a small config."""
import torch

from fused_concept.training.data import TokenData
from fused_concept.training.config import TrainConfig

VOCAB, SEQ = 96, 9


def tiny_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config)


def tiny_data(seed=1, num_train=12, num_heldout=4):
    g = torch.Generator().manual_seed(seed)
    n = num_train + num_heldout
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    concepts = torch.randint(0, VOCAB, (n, SEQ, 3), generator=g)
    concepts[torch.rand(n, SEQ, 3, generator=g) < 0.4] = -1
    concepts[:, ::4] = -1  # function words: no concept set
    return TokenData(ids[:num_train], concepts[:num_train], ids[num_train:], concepts[num_train:])


def small_config(tmp_path, **overrides):
    options = dict(out_dir=str(tmp_path), steps=3, batch_size=4, micro_batch_size=2, lr=3e-2, warmup_steps=1,
                   progress=False, plot=False, lam=0.5, margin=0.6, checkpoint_every=1,
                   lora_dropout=0.0)  # dropout masks depend on how a step is split; the resume test turns it on
    options.update(overrides)
    return TrainConfig(**options)
