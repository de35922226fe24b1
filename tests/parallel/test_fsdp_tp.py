"""Sharded heads on 2 gloo CPU ranks: FSDP2 (fully_shard on the layers, the head and the root) and tensor
parallelism with a DTensor head sharded Shard(0) on the vocabulary (torchtitan style).

FSDP2: a plain model whose fused head (fc.fuse_head) computes the loss in its own forward, and a transformers
Llama after hf.patch, train a few SGD steps on each rank's own data; every parameter's update must equal
single-process float64 training on both ranks' data with the loss written from the contract
(tests/helpers/contract.py). Handing the sharded weight to concept_loss directly raises the error that names the fix.
Tensor parallel: loss, statistics and the gradients of hidden, the weight blocks and the bias blocks against
the float64 contract. One spawn runs every case; the parent turns the per-rank verdicts into pytest cases.
"""
import copy
import datetime
import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fused_concept as fc
from helpers.contract import as_float64, contract_loss, paper_objective_weights, rel_err

WORLD = 2
V, D, K = 37, 8, 3  # V odd: the Shard(0) blocks differ in size (19 + 18)
TIMEOUT_S = 240
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def _rows(seed, b=2, t=6, v=V):
    """One rank's batch: ids, targets and concepts with ignored rows, rows without a concept, duplicates;
    the counts of valid and content rows differ between ranks (seed)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (b, t), generator=g)
    y = torch.randint(0, v, (b, t), generator=g)
    y[0, : 1 + seed % 3] = -100
    c = torch.randint(0, v, (b, t, K), generator=g)
    c[torch.rand(b, t, K, generator=g) < 0.3] = -1
    c[1, : 1 + seed % 2] = -1
    c[0, 4, 1] = c[0, 4, 0]
    return ids, y, c


def _global_counts(y, c, rank_scale):
    """(valid rows, content rows) of all ranks together, divided by the world size: FSDP averages gradients."""
    valid = y != -100
    counts = torch.stack([valid.sum(), (valid & (c != -1).any(-1)).sum()]).double()
    dist.all_reduce(counts)
    return counts / rank_scale


def _check_updates(sharded, before, reference, steps, tol=1e-4):
    """Each parameter's change over training (gathered from its shards) against the reference's change, up
    to tol relative plus the rounding of the float32 parameters themselves (half an ulp per step)."""
    eps = torch.finfo(torch.float32).eps
    for (name, p), (_, p0), (_, p_ref) in zip(sharded.named_parameters(), before.named_parameters(),
                                             reference.named_parameters()):
        start = p0.detach().double()
        got = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double() - start
        want = p_ref.detach() - start
        assert want.norm() > 0, name
        err = float((got - want).norm())
        assert err <= tol * float(want.norm()) + steps * eps * float(start.norm()), (name, err, float(want.norm()))


# ------------------------------------------------------------------------------------------------ FSDP2


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.layer = torch.nn.Linear(D, D)
        self.head = torch.nn.Linear(D, V)
        self.pass_weight = False  # the mistake: hand the (sharded) head weight to the loss directly

    def trunk(self, ids):
        return torch.tanh(self.layer(self.embed(ids)))

    def forward(self, ids, y, c, counts=None):
        h = self.trunk(ids)
        if self.pass_weight:
            return fc.concept_objective(h, self.head.weight, y, c, bias=self.head.bias)
        return self.head(h, y, c, num_items_in_batch=counts[0], num_content=counts[1])


def _fsdp(model, blocks):
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    return fully_shard(model)


@case
def fsdp_fused_head_trains_like_one_process(rank):
    lam, steps, lr = 0.4, 3, 0.5
    torch.manual_seed(0)
    model = TinyLM()
    fc.fuse_head(model.head, lam=lam, margin=None)
    before, reference = copy.deepcopy(model), copy.deepcopy(model).double()
    _fsdp(model, [model.layer, model.head])
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=lr)
    for step in range(steps):
        batches = [_rows(100 * step + r) for r in range(WORLD)]
        ids, y, c = batches[rank]
        model(ids, y, c, _global_counts(y, c, WORLD)).backward()
        opt.step()
        opt.zero_grad()
        # one process, both ranks' rows, the contract's objective in float64
        ids, y, c = (torch.cat(parts) for parts in zip(*batches))
        h = reference.trunk(ids)
        loss, _ = contract_loss(h, reference.head.weight, y, c, bias=reference.head.bias,
                                **paper_objective_weights(y, c, lam))
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    _check_updates(model, before, reference, steps)


@case
def fsdp_sharded_weight_passed_directly_raises(rank):
    torch.manual_seed(0)
    model = TinyLM()
    _fsdp(model, [model.layer, model.head])
    model.pass_weight = True
    ids, y, c = _rows(rank)
    with pytest.raises(ValueError, match=r"weight as a DTensor.*fuse_head.*full_tensor"):
        model(ids, y, c)


@case
def fsdp_hf_patched_llama_trains_like_one_process(rank):
    transformers = pytest.importorskip("transformers")
    from fused_concept.integrations import hf as hf

    lam, steps, lr, vocab = 0.5, 2, 0.5, 64
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    before, reference = copy.deepcopy(model), copy.deepcopy(model).double()
    hf.patch(model, lam=lam, margin=None)
    _fsdp(model, [*model.model.layers, model.lm_head])
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=lr)
    for step in range(steps):
        batches = [_rows(200 * step + r, v=vocab) for r in range(WORLD)]
        ids, y, c = batches[rank]
        labels = torch.where(y == -100, y, ids)  # labels are the inputs, some ignored
        counts = _global_counts(labels[:, 1:], c[:, 1:], WORLD)
        out = model(input_ids=ids, labels=labels, concepts=c, num_items_in_batch=counts[0], num_content=counts[1])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        ids, y, c = (torch.cat(parts) for parts in zip(*batches))
        labels = torch.where(y == -100, y, ids)
        hidden, weight, bias, cap = hf.hidden_and_head(reference, ids)
        loss, _ = contract_loss(hidden[:, :-1], weight, labels[:, 1:], c[:, 1:], bias=bias, softcap=cap,
                                **paper_objective_weights(labels[:, 1:], c[:, 1:], lam))
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    _check_updates(model, before, reference, steps)


# ------------------------------------------------------------------------------------------------ tensor parallel


def _tp_inputs(seed):
    from torch.distributed.device_mesh import init_device_mesh

    g = torch.Generator().manual_seed(seed)  # the same on both ranks: replicated
    h = torch.randn(2, 5, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.6
    b = torch.randn(V, generator=g) * 0.5
    _, y, c = _rows(seed, t=5)
    return init_device_mesh("cpu", (WORLD,)), h, w, b, y, c


@case
def tp_vocab_sharded_head_matches_the_contract(rank):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh, h, w, b, y, c = _tp_inputs(7)
    h64, w64, b64 = as_float64(h.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    upstream = torch.tensor(1.3, dtype=torch.float64)
    options = dict(margin=0.5, softcap=3.0, z_loss=1e-3)
    ref, ref_stats = contract_loss(h64, w64, y, c, bias=b64, **options)
    ref_grads = torch.autograd.grad(ref * upstream, (h64, w64, b64))
    for hidden_placement in (Replicate(), Shard(0)):  # replicated rows, or rows split as by sequence parallel
        hd = distribute_tensor(h.detach(), mesh, [hidden_placement]).requires_grad_()
        wd = distribute_tensor(w.detach(), mesh, [Shard(0)]).requires_grad_()
        bd = distribute_tensor(b.detach(), mesh, [Shard(0)]).requires_grad_()
        assert wd.to_local().shape[0] == (19, 18)[rank]
        loss, stats = fc.concept_loss(hd, wd, y, c, bias=bd, return_stats=True, **options)
        (loss * upstream.float()).backward()
        assert rel_err(loss, ref) < 2e-5
        assert rel_err(stats.lse, ref_stats["lse"]) < 2e-5 and torch.equal(stats.argmax, ref_stats["argmax"])
        for got, want in zip((hd.grad, wd.grad, bd.grad), ref_grads):
            assert tuple(got.placements) == ((hidden_placement,) if got is hd.grad else (Shard(0),))
            assert rel_err(got.full_tensor(), want) < 1e-4
    # the paper objective goes through the same entry
    hd = distribute_tensor(h.detach(), mesh, [Replicate()])
    wd = distribute_tensor(w.detach(), mesh, [Shard(0)])
    got = fc.concept_objective(hd, wd, y, c, lam=0.3, margin=None)
    want, _ = contract_loss(h64, w64, y, c, **paper_objective_weights(y, c, 0.3))
    assert rel_err(got, want) < 2e-5


@case
def tp_other_layouts_raise(rank):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh, h, w, b, y, c = _tp_inputs(8)
    hd = distribute_tensor(h, mesh, [Replicate()])
    with pytest.raises(ValueError, match=r"Shard\(0\) \(vocabulary rows\) over a 1-D device mesh"):
        fc.concept_loss(hd, distribute_tensor(w, mesh, [Replicate()]), y, c)
    wd = distribute_tensor(w, mesh, [Shard(0)])
    with pytest.raises(ValueError, match="bias must be None or a DTensor sharded Shard"):
        fc.concept_loss(hd, wd, y, c, bias=b)
    with pytest.raises(ValueError, match="kernel_options are not supported"):
        fc.concept_loss(hd, wd, y, c, kernel_options={"deterministic": True})
    with pytest.raises(ValueError, match="hidden is a DTensor but weight is not"):
        fc.concept_loss(hd, w, y, c)


# ------------------------------------------------------------------------------------------------ spawn


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, fn in CASES.items():
            try:
                fn(rank)
                results[name] = "ok"
            except BaseException as exc:  # pytest's "DID NOT RAISE" and skips are BaseExceptions
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                skipped = type(exc).__name__ == "Skipped"
                results[name] = f"skip: {exc}" if skipped else "fail: " + traceback.format_exc(limit=8)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    work = tmp_path_factory.mktemp("fsdp_tp")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(work / "store"), str(work)), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
    return {r: json.loads((work / f"rank{r}.json").read_text()) if (work / f"rank{r}.json").exists() else {}
            for r in range(WORLD)}, [p.exitcode for p in procs]


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_head(rank_results, name):
    per_rank, codes = rank_results
    verdicts = {r: per_rank[r].get(name, f"missing (exit code {codes[r]})") for r in range(WORLD)}
    bad = {r: v for r, v in verdicts.items() if v != "ok" and not v.startswith("skip")}
    if bad:
        pytest.fail("\n".join(f"rank {r}: {v}" for r, v in bad.items()))
    if any(v.startswith("skip") for v in verdicts.values()):
        pytest.skip(verdicts[0])
