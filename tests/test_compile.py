"""torch.compile(fullgraph=True) over the fused loss: no graph breaks, the numbers of eager mode and of the
float64 contract (tests/helpers/contract.py), value checks that still raise at run time, and the registered ops'
own consistency (torch.library.opcheck: fake shapes, autograd registration).

Compiling is slow on a 2-core CPU, so the cases are few and tiny: most use backend="aot_eager" (Dynamo +
AOTAutograd, which trace the ops' fake implementations and the registered backward), and one training step
of a small model goes through Inductor.
"""
import copy

import pytest
import torch

import fused_concept as fc
from helpers.contract import as_float64, contract_loss, paper_objective_weights, rel_err

V, D = 40, 8


def _inputs(seed, n=12, k=3, *, bias=True, probs=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, generator=g).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.6).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).requires_grad_() if bias else None
    y = torch.randint(0, V, (n,), generator=g)
    y[3] = -100
    c = torch.randint(0, V, (n, k), generator=g)
    c[torch.rand(n, k, generator=g) < 0.3] = -1
    c[5] = -1  # a row that lists no id
    c[7, 1] = c[7, 0]  # a duplicate
    c[8, 2] = y[8]  # the gold id listed
    p = torch.rand(n, k, generator=g) if probs else None
    return h, w, b, y, c, p


# name -> (the function compiled, the same loss from the float64 contract)
CASES = {
    "concept_loss": (
        lambda h, w, b, y, c, p: fc.concept_loss(h, w, y, c, bias=b, margin=0.5, softcap=4.0, z_loss=1e-3),
        lambda h, w, b, y, c, p: contract_loss(h, w, y, c, bias=b, margin=0.5, softcap=4.0, z_loss=1e-3)[0],
    ),
    "concept_objective": (
        lambda h, w, b, y, c, p: fc.concept_objective(h, w, y, c, bias=b, lam=0.3, margin=None),
        lambda h, w, b, y, c, p: contract_loss(h, w, y, c, bias=b, **paper_objective_weights(y, c, 0.3))[0],
    ),
    "ConceptLoss_soft_rows": (
        lambda h, w, b, y, c, p: _SOFT_ROWS(h, w, y, c, bias=b, concept_probs=p),
        lambda h, w, b, y, c, p: contract_loss(h, w, y, c, bias=b, concept_probs=p, mode="soft", reduction="none",
                                               include_target=False, ntp_weight=0.7)[0],
    ),
}
_SOFT_ROWS = fc.ConceptLoss(mode="soft", reduction="none", include_target=False, ntp_weight=0.7)


def _loss_and_grads(fn, h, w, b, y, c, p, upstream):
    params = [t for t in (h, w, b) if t is not None]
    loss = fn(h, w, b, y, c, p)
    return loss.detach(), torch.autograd.grad(loss, params, upstream.to(loss.dtype).expand(loss.shape))


@pytest.mark.parametrize("case", CASES)
def test_fullgraph_compile_gives_eager_and_contract_numbers(case):
    fn, contract_fn = CASES[case]
    h, w, b, y, c, p = _inputs(seed=len(case), probs=case.endswith("soft_rows"))
    explained = torch._dynamo.explain(fn)(h, w, b, y, c, p)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    upstream = torch.tensor(1.7, dtype=torch.float64)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got_loss, got_grads = _loss_and_grads(compiled, h, w, b, y, c, p, upstream)
    eager_loss, eager_grads = _loss_and_grads(fn, h, w, b, y, c, p, upstream)
    assert torch.equal(got_loss, eager_loss)
    for got, eager in zip(got_grads, eager_grads):
        assert torch.equal(got, eager)

    h64, w64, b64 = as_float64(h, w, b)
    p64 = None if p is None else p.double()
    ref_loss, ref_grads = _loss_and_grads(contract_fn, h64, w64, b64, y, c, p64, upstream)
    assert rel_err(got_loss, ref_loss) < 2e-5
    for got, ref in zip(got_grads, ref_grads):
        assert rel_err(got, ref) < 1e-4


def test_bad_ids_raise_the_eager_error_from_compiled_code():
    h, w, b, y, c, _ = _inputs(seed=1)
    fn = torch.compile(lambda h_, w_, y_, c_: fc.concept_loss(h_, w_, y_, c_), fullgraph=True, backend="aot_eager")
    assert rel_err(fn(h, w, y, c), contract_loss(*as_float64(h, w), y, c)[0]) < 2e-5
    bad_target, bad_concept = y.clone(), c.clone()
    bad_target[2], bad_concept[4, 0] = V + 7, -5
    for targets, concepts, message in ((bad_target, c, f"targets holds id {V + 7} outside the vocabulary"),
                                       (y, bad_concept, "concepts holds id -5 outside the vocabulary")):
        with pytest.raises(ValueError, match=message):
            fc.concept_loss(h, w, targets, concepts)
        with pytest.raises(ValueError, match=message):
            fn(h, w, targets, concepts)


def test_registered_ops_pass_opcheck():
    """Fake implementations agree with the real ones (shapes, dtypes, strides), the schema and the
    autograd registration are consistent, for the fused and the recomputing backward."""
    from fused_concept.core.inputs import prepare
    from fused_concept.core.options import LossOptions
    from fused_concept.core.ops import _encode, _flat

    h, w, b, y, c, _ = _inputs(seed=2)
    canon = prepare(h, w, y, c, bias=b, options=LossOptions(margin=0.5))
    ops = torch.ops.fused_concept
    torch.library.opcheck(ops.checked_valid_rows.default, (y, c, -100, V))
    for reduction, fuse in (("mean", (True, True, True)), ("none", (False, False, False))):
        args = (*_flat(canon), "torch", reduction, _encode({}), *fuse)
        torch.library.opcheck(ops.loss_forward.default, args)
    lse, set_lse, hinge = (torch.rand(len(y)) + 3.0, torch.rand(len(y)) + 2.0, torch.ones(len(y)))
    # the backward op runs inside autograd's backward, on tensors that do not require a gradient
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in _flat(canon)]
    backward_args = (*detached, lse, set_lse, hinge, torch.rand(len(y)), "torch", _encode({}), True, True, True)
    torch.library.opcheck(ops.loss_backward.default, backward_args)


def test_triton_kernels_run_as_the_registered_op_in_compiled_code():
    """impl="triton" inside a compiled function: Dynamo sees one op and its body launches the Triton kernels
    (here in Triton's interpreter on CPU tensors; on CUDA the same op launches them on the GPU)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not fc.core.dispatch.interpreting():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    h, w, b, y, c, _ = _inputs(seed=3, n=10)
    on = [t.detach().to(dev).requires_grad_() for t in (h, w, b)]
    fn = lambda h_, w_, b_: fc.concept_loss(h_, w_, y.to(dev), c.to(dev), bias=b_, impl="triton",  # noqa: E731
                                            margin=0.5, kernel_options={"deterministic": True})
    explained = torch._dynamo.explain(fn)(*on)
    assert explained.graph_break_count == 0, explained.break_reasons
    got_loss, got_grads = _loss_and_grads(lambda *a: torch.compile(fn, fullgraph=True, backend="aot_eager")(*a[:3]),
                                          *on, y, c, None, torch.tensor(0.8, device=dev))
    got_loss, got_grads = got_loss.cpu(), [g.cpu() for g in got_grads]
    h64, w64, b64 = as_float64(h, w, b)
    ref_loss, ref_grads = _loss_and_grads(lambda *a: contract_loss(*a[:2], y, c, bias=a[2], margin=0.5)[0],
                                          h64, w64, b64, y, c, None, torch.tensor(0.8, dtype=torch.float64))
    assert rel_err(got_loss, ref_loss) < 2e-5
    for got, ref in zip(got_grads, ref_grads):
        assert rel_err(got, ref) < 1e-4


class TinyLM(torch.nn.Module):
    """Embedding, one tanh layer and an LM head whose own forward computes the loss (fc.fuse_head)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.layer = torch.nn.Linear(D, D)
        self.head = fc.fuse_head(torch.nn.Linear(D, V), lam=0.4, margin=None)

    def trunk(self, ids):
        return torch.tanh(self.layer(self.embed(ids)))

    def forward(self, ids, targets, concepts):
        return self.head(self.trunk(ids), targets, concepts)


def test_inductor_training_step_of_a_model_calling_the_loss():
    """One Inductor compile (the slow part of this file) of a model's forward and backward: loss and every
    parameter's gradient as in eager mode and as the float64 contract gives them."""
    torch.manual_seed(0)
    model = TinyLM()
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, V, (2, 7), generator=g)
    _, _, _, y, c, _ = _inputs(seed=9, n=14)
    y, c = y.reshape(2, 7), c.reshape(2, 7, -1)

    compiled = torch.compile(model, fullgraph=True)  # Inductor
    with torch._inductor.config.patch(compile_threads=1):  # no worker pool: faster on 2 cores
        loss = compiled(ids, y, c)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager = model(ids, y, c)
    eager.backward()
    assert rel_err(loss, eager) < 1e-6
    for n, p in model.named_parameters():
        assert rel_err(got[n], p.grad) < 1e-5, n

    ref = copy.deepcopy(model).double()
    ref_loss, _ = contract_loss(ref.trunk(ids), ref.head.weight, y, c, bias=ref.head.bias,
                                **paper_objective_weights(y.reshape(-1), c.reshape(14, -1), 0.4))
    ref_loss.backward()
    assert rel_err(loss, ref_loss) < 2e-5
    for (n, p), (_, p64) in zip(model.named_parameters(), ref.named_parameters()):
        assert rel_err(got[n], p64.grad) < 1e-4, n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_cuda_bf16_inductor_training_step(impl):
    """On a GPU, the usual setting: bf16 parameters, Inductor, fullgraph, impl "torch" and "triton": loss and
    gradients as in eager mode (bf16 rounding) and as the float64 contract gives them."""
    if impl == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    model = TinyLM().cuda().to(torch.bfloat16)
    fc.fuse_head(model.head, lam=0.4, margin=None, impl=impl)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, V, (2, 7), generator=g).cuda()
    _, _, _, y, c, _ = _inputs(seed=9, n=14)
    y, c = y.reshape(2, 7).cuda(), c.reshape(2, 7, -1).cuda()
    loss = torch.compile(model, fullgraph=True)(ids, y, c)
    loss.backward()
    got = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(ids, y, c).backward()
    for n, p in model.named_parameters():
        assert rel_err(got[n], p.grad.float()) < 2e-2, n
    ref = copy.deepcopy(model).double()
    ref_loss, _ = contract_loss(ref.trunk(ids), ref.head.weight, y, c, bias=ref.head.bias,
                                **paper_objective_weights(y.reshape(-1).cpu(), c.reshape(14, -1).cpu(), 0.4))
    ref_loss.backward()
    assert rel_err(loss.float().cpu(), ref_loss.cpu()) < 2e-2
    for (n, p), (_, p64) in zip(model.named_parameters(), ref.named_parameters()):
        assert rel_err(got[n].cpu(), p64.grad.cpu()) < 3e-2, n
