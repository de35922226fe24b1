"""transformers.Trainer trains a patched model: the collator's batches, and two optimizer steps with gradient
accumulation against a manual loop over the same batches whose loss is written from the contract
(tests/helpers/contract.py) in float64: the cross-entropy normalised by the label tokens of the whole step
(the Trainer's num_items_in_batch), and the paper objective with the step's counts N_v and |T|
(ConceptTrainer's num_content). A tiny random Llama in float64 on CPU, so the comparison is tight
(float32 row weights are the only coarser rounding).
"""
import copy

import pytest
import torch

from helpers.contract import contract_loss, paper_objective_weights, rel_err

transformers = pytest.importorskip("transformers")
from fused_concept.integrations import hf as hf  # noqa: E402

V, LAM, LR, BATCH, ACCUMULATE, STEPS = 64, 0.4, 0.5, 2, 2, 2


def _examples(seed=0, count=BATCH * ACCUMULATE * STEPS):
    """Sequences of different lengths; concepts as ragged lists (some positions with none, some examples
    without any concept), labels ignored at a few positions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        length = int(torch.randint(5, 10, (1,), generator=g))
        ids = torch.randint(3, V, (length,), generator=g).tolist()
        sets = [torch.randint(3, V, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g).tolist()
                for _ in range(length)]
        example = dict(input_ids=ids, concepts=sets)
        if i % 3 == 1:
            example["labels"] = [-100 if t % 4 == 0 else tok for t, tok in enumerate(ids)]
        if i == 5:
            del example["concepts"]
        out.append(example)
    return out


def _model():
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double()


def test_collator_pads_and_aligns_concepts():
    examples = [dict(input_ids=[5, 6, 7], concepts=[[9], [], [10, 11, 12]], concept_probs=[[0.5], [], [0.1, 0.2, 0.3]]),
                dict(input_ids=[8, 9], labels=[-100, 9], concepts=torch.tensor([[4, -1], [5, 6]])),
                dict(input_ids=[3])]
    batch = hf.ConceptCollator(pad_token_id=1)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 1], [3, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [-100, 9, -100], [3, -100, -100]]
    assert batch["concepts"].tolist() == [[[9, -1, -1], [-1, -1, -1], [10, 11, 12]],
                                          [[4, -1, -1], [5, 6, -1], [-1, -1, -1]],
                                          [[-1, -1, -1]] * 3]
    assert torch.equal(batch["concept_probs"][0], torch.tensor([[0.5, 0, 0], [0, 0, 0], [0.1, 0.2, 0.3]]))
    assert batch["concept_probs"][1:].abs().sum() == 0
    assert hf.ConceptCollator(max_concepts=1)(examples)["concepts"][0, 2].tolist() == [10]
    with pytest.raises(ValueError, match="concepts of example 0 has 2 rows but its input_ids has 3 tokens"):
        hf.ConceptCollator()([dict(input_ids=[1, 2, 3], concepts=[[4], [5]])])


def _train_with_trainer(model, trainer_class, examples, tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATE,
        max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant", optim="sgd", weight_decay=0.0,
        max_grad_norm=0.0, warmup_steps=0, logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, seed=0)

    class InOrder(torch.utils.data.IterableDataset):  # the same batches as the manual loop, in order
        def __iter__(self):
            return iter(examples)

    trainer = trainer_class(model=model, args=args, train_dataset=InOrder(), data_collator=hf.ConceptCollator())
    trainer.train()


def _manual_loop(model, examples, lam):
    """Plain SGD over the same micro-batches; each micro-batch's loss is the contract's, with the counts of
    its whole optimizer step (cross-entropy: sum / label tokens; objective: N_v and |T| of the step)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    collate = hf.ConceptCollator()
    per_step = BATCH * ACCUMULATE
    for step in range(STEPS):
        micro = [collate(examples[step * per_step + m * BATCH:][:BATCH]) for m in range(ACCUMULATE)]
        shifted = [(b["labels"][:, 1:], b["concepts"][:, 1:] if lam is not None else None) for b in micro]
        n_valid = sum(int((y != -100).sum()) for y, _ in shifted)
        n_content = sum(int(((y != -100) & (c != -1).any(-1)).sum()) for y, c in shifted) if lam is not None else 0
        for b, (y, c) in zip(micro, shifted):
            hidden, weight, bias, cap = hf.hidden_and_head(model, b["input_ids"], attention_mask=b["attention_mask"])
            if lam is None:
                loss, _ = contract_loss(hidden[:, :-1], weight, y, bias=bias, softcap=cap, reduction="sum")
                loss = loss / n_valid
            else:
                loss, _ = contract_loss(hidden[:, :-1], weight, y, c, bias=bias, softcap=cap,
                                        **paper_objective_weights(y, c, lam, n_valid=n_valid, n_content=n_content))
            loss.backward()
        opt.step()
        opt.zero_grad()


def _check_same_training(trained, reference, start):
    """Parameter updates equal; the float64 model's only rounding above float64 is in the loss's row weights,
    which the package holds in float32 (1/N_v rounds at 6e-8)."""
    for (name, p), (_, q), (_, p0) in zip(trained.named_parameters(), reference.named_parameters(),
                                          start.named_parameters()):
        want = q.detach() - p0.detach()
        assert want.norm() > 0, name
        assert rel_err(p.detach() - p0.detach(), want) < 1e-6, (name, rel_err(p.detach() - p0.detach(), want))


def test_concept_trainer_with_gradient_accumulation_equals_the_objective_on_each_step(tmp_path):
    examples = _examples()
    model = _model()
    start, reference = copy.deepcopy(model), copy.deepcopy(model)
    hf.patch(model, lam=LAM, margin=None)
    _train_with_trainer(model, hf.ConceptTrainer, examples, tmp_path)
    _manual_loop(reference, examples, LAM)
    _check_same_training(model, reference, start)


def test_plain_trainer_normalises_cross_entropy_through_num_items_in_batch(tmp_path):
    examples = [{k: v for k, v in e.items() if k != "concepts"} for e in _examples(seed=1)]
    model = _model()
    start, reference = copy.deepcopy(model), copy.deepcopy(model)
    hf.patch(model)
    _train_with_trainer(model, transformers.Trainer, examples, tmp_path)
    _manual_loop(reference, examples, None)
    _check_same_training(model, reference, start)
