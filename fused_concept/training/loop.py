"""Reference training loop: fine-tune a causal LM with the paper's concept objective.

Read top to bottom, as nanoGPT's train.py. `train(config)` runs the job:

    setup   run.start_run (process group, device) -> run.setup_model -> run.setup_data (token chunks,
            concept sets) -> run.setup_trainee (LoRA or every weight, DDP) -> run.setup_optimizer
    resume  checkpoints.resume_point (newest checkpoint in out_dir, when --resume; read and checked first)
            -> checkpoints.resume (loaded once the model and optimizer exist)
    loop    evaluate (held-out, before) -> `train_loop`: every optimizer step in its body
    report  evaluate (held-out, after) -> report.result -> report.write_outputs (metrics.json, table,
            curves.png) -> checkpoints.save_adapters

The logits are never formed. Each micro-batch runs the model WITHOUT its LM head (`run.Trunk`) and hands
the final hidden states and the head's weight to `concept_objective`, whose fused kernels compute the
loss, its gradient and per-row statistics.

Token normalisation. One optimizer step sees `batch_size` sequences, split over ranks and then
over micro-batches. With N_v the valid rows and |T| the content rows of ALL those sequences, each
micro-batch contributes

    (1/N_v) [ sum_{valid, not content} ce_i + (1 - lam) sum_{content} ce_i ] + (lam/|T|) sum_{content} cl_i

over its own rows, so the gradients summed over micro-batches and ranks are exactly the gradient of
the paper's loss on the whole step's batch, however it is split. (DistributedDataParallel averages
over ranks, so each rank scales its loss by the world size.) Every rank holds the whole (small)
token set, so N_v and |T| are counted locally from the step's sequence indices, which are a pure
function of (seed, step): that also makes `--resume` reproduce an uninterrupted run exactly.

Multi-process: under `torchrun --nproc_per_node=N` the model is wrapped in DistributedDataParallel
(gloo on CPU, nccl on CUDA); only rank 0 writes checkpoints, metrics and the plot. With
`--vocab-parallel` the trunk stays data-parallel but the LM head is split by vocabulary rows: the
ranks' final hidden states are all-gathered, every rank applies its block of head rows to all of them
(`fused_concept.parallel.vocab_parallel_concept_objective`, identical loss on every rank), and
the trunk's gradients are summed over ranks by hand instead of by DDP.
"""

from __future__ import annotations

import contextlib
import time
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from fused_concept import concept_objective, content_rows
from fused_concept.training.checkpoints import State, resume, resume_point, save_adapters, save_checkpoint
from fused_concept.training.config import TrainConfig, resolve_schedule, validate
from fused_concept.training.data import TokenData, load_text
from fused_concept.training.evaluate import evaluate_heldout
from fused_concept.training.report import describe_job, result, summary, write_outputs
from fused_concept.training.run import (Run, Trainee, autocast, end_run, log, micro_batches_per_step, setup_data,
                                        setup_model, setup_optimizer, setup_trainee, start_run)


def train(config: TrainConfig, *, model: Optional[nn.Module] = None, tokenizer=None,
          data: Optional[TokenData] = None, before: Optional[Dict] = None) -> Dict:
    """Run the whole job described by `config`; returns the metrics dict also written to metrics.json.

    `model` / `tokenizer` / `data` replace the loaded model and the built token data (tests pass a tiny
    random model and hand-made concepts this way); `before` replaces the evaluation before training
    (the sweep's runs share one: same model, same data). Bad settings raise `ConfigError` first.
    """
    t_start = time.time()
    validate(config)
    config = resolve_schedule(config)
    run = start_run(config)
    finished = False
    try:
        outcome = _job(config, run, model, tokenizer, data, before, t_start)
        finished = True
        return outcome
    finally:
        end_run(run, finished)


def _job(config: TrainConfig, run: Run, model, tokenizer, data, before, t_start: float) -> Dict:
    """setup -> resume -> evaluate before -> the loop -> evaluate after -> report."""
    torch.manual_seed(config.seed)
    accum = micro_batches_per_step(config, run.world)
    seconds = dict.fromkeys(("load_model", "concepts", "evaluate", "train"), 0.0)
    given_data = data is not None
    # first, so that they fail before the slow model load: the checkpoint to resume (written with these
    # settings?) and the corpus (a bad --data)
    point = resume_point(config)
    text = None if given_data else load_text(config.data)

    with timed(seconds, "load_model"):
        model, tokenizer = setup_model(config, run, model, tokenizer)
    with timed(seconds, "concepts"):
        data = data if given_data else setup_data(config, run, text, model, tokenizer)
    describe_job(config, data, *row_counts(data.train_ids, data.train_concepts),
                 is_default_job=config.model is None and config.data is None and not given_data)
    trainee = setup_trainee(config, run, model)
    optimizer, scheduler = setup_optimizer(config, trainee)
    state = resume(point, trainee, optimizer, scheduler)
    state.before = state.before or before

    rows = {}  # per-row held-out NLL, for paired bootstrap intervals between runs
    with timed(seconds, "evaluate"):
        if state.before is None:
            state.before = evaluate_heldout(config, run, trainee.net, tokenizer, data, rows.setdefault("before", {}))
            log("held-out before: " + summary(state.before))
    with timed(seconds, "train"):
        train_loop(config, run, trainee, data, optimizer, scheduler, state, accum)
    with timed(seconds, "evaluate"):
        after = evaluate_heldout(config, run, trainee.net, tokenizer, data, rows.setdefault("after", {}))

    seconds["total"] = time.time() - t_start
    outcome = result(config, run, data, text, state, after, seconds)
    if run.rank == 0:
        write_outputs(config, outcome, rows)
        save_adapters(config, trainee)
    return outcome


# ============================================================================= the loop


def train_loop(config: TrainConfig, run: Run, trainee: Trainee, data: TokenData, optimizer, scheduler,
               state: State, accum: int) -> None:
    """Optimizer steps from `state.step` to `config.steps`, each in full below; one record per step."""
    bar = progress_bar(config, run, state.step)
    params = list(trainee.trainable.values())
    trainee.net.train()
    while state.step < config.steps:
        chosen = step_sequences(state.step, config.batch_size, data.train_ids.shape[0], config.seed)
        num_valid, num_content = row_counts(data.train_ids[chosen], data.train_concepts[chosen])  # all ranks'
        sums = torch.zeros(3, dtype=torch.float64, device="cpu")  # objective, sum of CE (valid), of mass (content)
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accum):
            mine, loss_rows = micro_batch_rows(config, run, trainee, chosen, micro)
            ids = data.train_ids[mine].to(run.device)
            targets = data.train_ids[loss_rows, 1:].to(run.device)
            concepts = data.train_concepts[loss_rows, 1:].to(run.device)
            with trainee.no_sync(micro == accum - 1):
                with autocast(run):
                    hidden, weight, bias, softcap = trainee.trunk(ids[:, :-1])  # the model without its head
                if weight.dtype != hidden.dtype:
                    weight = weight.to(hidden.dtype)
                    bias = bias.to(hidden.dtype) if bias is not None else None
                options = dict(lam=config.lam, margin=config.margin, num_valid=num_valid, num_content=num_content,
                               bias=bias, softcap=softcap, impl=config.impl, return_stats=True)
                if trainee.vocab_parallel:
                    loss, stats = vocab_parallel_loss(hidden, weight, targets, concepts, **options)
                else:
                    loss, stats = concept_objective(hidden, weight, targets, concepts, **options)
                (loss * run.world if trainee.ddp is not None else loss).backward()
            content = content_rows(targets, concepts)
            sums += torch.stack([loss.detach().double().cpu(), stats.ce.double().sum().cpu(),
                                 stats.mass.double()[content].sum().cpu()])
        if trainee.vocab_parallel:  # the trunk is not wrapped in DDP: sum its gradients over ranks here
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip) if config.grad_clip > 0 else None
        lr_used = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        if trainee.ddp is not None:  # each rank summed its own rows; vocab-parallel ranks saw every row
            sums = sums.to(run.device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        record = {"step": state.step + 1, "loss": sums[0].item(), "ce": sums[1].item() / num_valid,
                  "mass": sums[2].item() / max(1, num_content), "lr": lr_used,
                  "grad_norm": None if grad_norm is None else float(grad_norm)}
        state.history.append(record)
        state.step += 1
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", ce=f"{record['ce']:.3f}", mass=f"{record['mass']:.3f}")
            bar.update(1)
        every = config.checkpoint_every
        if run.rank == 0 and ((every > 0 and state.step % every == 0) or state.step == config.steps):
            save_checkpoint(config, trainee, optimizer, scheduler, state)
    if bar is not None:
        bar.close()


# ============================================================================= the loop's helpers


def step_sequences(step: int, batch_size: int, num_train: int, seed: int) -> torch.Tensor:
    """Indices of the training sequences of optimizer step `step`: consecutive slices of a fresh
    seeded permutation per epoch; a pure function of its arguments (resume-safe). On the CPU, as the
    token data it indexes: the batches move to the run's device after indexing."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size, device="cpu")
    out = torch.empty(batch_size, dtype=torch.long, device="cpu")
    for epoch in positions.div(num_train, rounding_mode="floor").unique().tolist():
        generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(num_train, generator=generator, device="cpu")
        here = positions.div(num_train, rounding_mode="floor") == epoch
        out[here] = perm[positions[here] % num_train]
    return out


def row_counts(ids: torch.Tensor, concepts: torch.Tensor) -> Tuple[int, int]:
    """(N_v, |T|): the valid rows and the content rows (`fused_concept.content_rows`) that sequences `ids`
    [B, T] with token-aligned `concepts` [B, T, K] predict (row t predicts token t + 1)."""
    targets, sets = ids[:, 1:], concepts[:, 1:]
    return int((targets != -100).sum()), int(content_rows(targets, sets).sum())


def micro_batch_rows(config: TrainConfig, run: Run, trainee: Trainee, chosen: torch.Tensor,
                     micro: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sequences this rank runs the trunk on, sequences the loss sees) for one micro-batch. They are
    the same, except under --vocab-parallel, where the loss sees every rank's micro-batch (gathered)."""
    per_rank, mb = config.batch_size // run.world, config.micro_batch_size

    def rank_micro(r):
        return chosen[r * per_rank:(r + 1) * per_rank][micro * mb:(micro + 1) * mb]

    mine = rank_micro(run.rank)
    if not trainee.vocab_parallel:
        return mine, mine
    return mine, torch.cat([rank_micro(r) for r in range(run.world)])


def vocab_parallel_loss(hidden, weight, targets, concepts, *, bias, **options):
    """Data-parallel trunk, vocab-parallel head: the ranks' hidden rows are gathered (every rank then
    holds the micro-batch of ALL ranks), each rank applies its block of head rows, and the loss is the
    step objective's share of the gathered rows, identical on every rank. `targets` / `concepts` here
    are already the gathered ones. Trunk gradients are summed over ranks after the backward."""
    from fused_concept.parallel import even_shard, gather_rows, vocab_parallel_concept_objective

    rank, world = dist.get_rank(), dist.get_world_size()
    shape = hidden.shape
    gathered = gather_rows(hidden.reshape(-1, shape[-1])).reshape(world * shape[0], *shape[1:])
    block = even_shard(weight.shape[0], rank, world)
    return vocab_parallel_concept_objective(gathered, weight[block], targets, concepts,
                                            bias=None if bias is None else bias[block], **options)


def progress_bar(config: TrainConfig, run: Run, start: int):
    """A tqdm bar over the optimizer steps on rank 0 (None without --progress or with nothing to do)."""
    if not (config.progress and run.rank == 0 and start < config.steps):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, desc=f"train lam={config.lam}", dynamic_ncols=True)


@contextlib.contextmanager
def timed(seconds: Dict[str, float], name: str):
    start = time.time()
    try:
        yield
    finally:
        seconds[name] += time.time() - start
