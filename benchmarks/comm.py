"""What the vocab-parallel loss all-reduces, counted and timed on CPU ranks (gloo):

    python -m benchmarks.comm [--world 2] [--vocab 32003] [--repeats 3] [--grid 256x256x4,...]

Spawns `--world` processes; each wraps `torch.distributed.all_reduce` to count the bytes it is given
and the time spent in it during one forward + backward of `vocab_parallel_concept_loss`, and rank 0
prints a Markdown table beside `communication_bytes`' formula (docs/distributed.md).
"""
import torch
import torch.distributed as dist

from fused_concept.parallel import communication_bytes, vocab_parallel_concept_loss


def _rank(rank: int, world: int, init_file: str, vocab: int, grid: list, repeats: int, out: str):
    """One rank of the measurement: count the bytes given to all_reduce and time them, per step."""
    import json
    import time

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    sizes = [vocab // world + (1 if r < vocab % world else 0) for r in range(world)]
    start = sum(sizes[:rank])
    real = dist.all_reduce
    log = []

    def timed(tensor, *args, **kwargs):
        t0 = time.perf_counter()
        result = real(tensor, *args, **kwargs)
        log.append((tensor.numel() * tensor.element_size(), time.perf_counter() - t0))
        return result

    rows = []
    dist.all_reduce = timed
    try:
        for n, d, k in grid:
            g = torch.Generator().manual_seed(0)
            h = torch.randn(n, d, generator=g).requires_grad_()
            w = (torch.randn(vocab, d, generator=g) * 0.1)[start:start + sizes[rank]].clone().requires_grad_()
            y = torch.randint(0, vocab, (n,), generator=g)
            c = torch.randint(0, vocab, (n, k), generator=g)
            best = None
            for _ in range(repeats):
                log.clear()
                dist.barrier()
                t0 = time.perf_counter()
                vocab_parallel_concept_loss(h, w, y, c, margin=0.6).backward()
                step = time.perf_counter() - t0
                comm = sum(s for _, s in log)
                if best is None or step < best[1]:
                    best = (sum(b for b, _ in log), step, comm)
            rows.append({"N": n, "D": d, "K": k, "bytes": best[0],
                         "formula": communication_bytes(n, d, has_sets=k > 0)["total"],
                         "step_s": best[1], "allreduce_s": best[2]})
    finally:
        dist.all_reduce = real
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world": world, "vocab": vocab, "sizes": sizes, "rows": rows}, f)
    dist.destroy_process_group()


def main(argv=None) -> None:
    import argparse
    import json
    import tempfile

    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description="bytes and time all-reduced per step by the vocab-parallel loss")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32003)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grid", default="256x256x4,256x256x16,1024x256x4,256x1024x4",
                        help="comma-separated NxDxK")
    args = parser.parse_args(argv)
    grid = [tuple(int(x) for x in item.split("x")) for item in args.grid.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/result.json"
        mp.spawn(_rank, args=(args.world, f"{tmp}/store", args.vocab, grid, args.repeats, out),
                 nprocs=args.world)
        with open(out) as f:
            result = json.load(f)
    print(f"world {result['world']}, V = {result['vocab']} split {result['sizes']}, gloo on CPU, "
          f"best of {args.repeats}")
    print("| N | D | K | bytes all-reduced (counted) | communication_bytes | step fwd+bwd (ms) | in all_reduce (ms) |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['N']} | {r['D']} | {r['K']} | {r['bytes']} | {r['formula']} | {1e3 * r['step_s']:.1f} "
              f"| {1e3 * r['allreduce_s']:.1f} |")


if __name__ == "__main__":
    main()
