"""Time one training step and one held-out evaluation of SmolLM2-135M at candidate sizes, to size the CPU
"medium" recipe (docs/training.md, "The medium setting"). Concept sets are random stand-ins (their cost is
measured separately: see the docs); the model, token chunks, loss and evaluation are the real ones.

    python benchmarks/medium_timing.py --batch 4 8 --heldout 32
"""
import argparse
import time

import torch

from fused_concept.training.config import TrainConfig
from fused_concept.training.data import TokenData, default_corpus_text, token_chunks
from fused_concept.training.loop import train
from fused_concept.training.run import load_named_model


def fake_concepts(ids, seed=0):
    g = torch.Generator().manual_seed(seed)
    sets = torch.randint(0, 49152, ids.shape + (10,), generator=g)
    sets[torch.rand(ids.shape + (10,), generator=g) < 0.5] = -1
    sets[torch.rand(ids.shape, generator=g) < 0.7] = -1  # ~30 % content rows
    sets[..., 0] = torch.where(sets[..., 1:].eq(-1).all(-1), -1, ids)  # gold first when a set exists
    return sets


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    t = time.time()
    model, tokenizer = load_named_model(TrainConfig())
    print(f"load model {time.time() - t:.1f} s")
    chunks = token_chunks(tokenizer, default_corpus_text(), args.seq_len)
    print(f"corpus: {chunks.shape[0]} chunks of {args.seq_len} tokens")
    train_ids, held = chunks[:64], chunks[-args.heldout:]
    data = TokenData(train_ids, fake_concepts(train_ids), held, fake_concepts(held, 1))
    for batch in args.batch:
        config = TrainConfig(out_dir=f"/tmp/medium-timing/b{batch}", seq_len=args.seq_len, steps=args.steps,
                             batch_size=batch, micro_batch_size=batch, num_train=64, num_heldout=args.heldout,
                             progress=False, plot=False, checkpoint_every=0)
        import copy
        out = train(config, model=copy.deepcopy(model), tokenizer=tokenizer, data=data)
        s = out["seconds"]
        print(f"batch {batch}: {s['train'] / args.steps:.2f} s/step; two evaluations of {args.heldout} held-out "
              f"sequences + word similarity {s['evaluate']:.1f} s ({s['evaluate'] / 2:.1f} s each)", flush=True)


if __name__ == "__main__":
    main()
