"""Every implementation of the loss behind one calling convention, for the tests that walk all of them:
`concept_loss` with impl "reference", "torch" and "triton" (Triton's interpreter on CPU), and the
vocab-parallel loss on a one-rank gloo group (the whole head is the rank's shard)."""
import contextlib
import functools
import os

import torch.distributed as dist

import fused_concept as fc
from fused_concept.parallel import vocab_parallel_concept_loss
from helpers.checks import check_against_contract

IMPLS = ("reference", "torch", "triton", "vocab_parallel")


def loss_fn(impl: str):
    """`concept_loss`'s signature (hidden, weight, targets, concepts=None, **options) for `impl`."""
    if impl == "vocab_parallel":
        return functools.partial(vocab_parallel_concept_loss, impl="torch")
    return functools.partial(fc.concept_loss, impl=impl)


@contextlib.contextmanager
def one_rank_group(folder):
    """A gloo process group of this process alone (destroyed on exit)."""
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(str(folder), 'store')}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_contract(impl: str, *args, **kwargs):
    """`helpers.checks.check_against_contract` (loss, statistics and gradients against the float64 contract)
    for any of IMPLS; the vocab-parallel loss takes concept_loss's place in it."""
    if impl != "vocab_parallel":
        return check_against_contract(impl, *args, **kwargs)

    def vocab_parallel(*a, impl, kernel_options, **kw):
        assert kernel_options is None
        return loss_fn("vocab_parallel")(*a, **kw)

    return check_against_contract(impl, *args, loss_fn=vocab_parallel, **kwargs)
