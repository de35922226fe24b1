"""Stress test of distributed start-up and shutdown: start and stop 2-rank CPU training many times.

    python tests/training/stress_shutdown.py --runs 20            (`make stress`)

Each run is `python -m torch.distributed.run --standalone --nproc_per_node=2` of this file in worker
mode: every rank calls `fused_concept.training.loop.train` on the tiny random Llama of tests/helpers/tiny.py, so
`train` itself creates the gloo process group (WORLD_SIZE=2), trains a few steps with DDP or with the
vocab-parallel head, and destroys the group. A run passes when both ranks exit with status 0 and
nothing on stderr says the process aborted. Any failure prints the run's stderr tail and the command
exits 1.

`--no-wait` replaces `fused_concept.training.run.wait_for_peers` (the barrier before
`destroy_process_group`) by a no-op, to show what happens without it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where helpers/ lives
ABORT_SIGNS = ("terminate called", "Aborted", "SIGABRT", "Signal 6", "core dumped", "gloo::", "Traceback")


def worker(out_dir: str, mode: str, no_wait: bool) -> None:
    sys.path.insert(0, HERE)
    from helpers.tiny import small_config, tiny_data, tiny_model

    from fused_concept.training import loop as train_module
    from fused_concept.training import run as run_module

    if no_wait:
        assert hasattr(run_module, "wait_for_peers")
        run_module.wait_for_peers = lambda: None
    config = small_config(out_dir, micro_batch_size=1, lora=False, steps=2,
                          vocab_parallel=mode == "vocab_parallel")
    train_module.train(config, model=tiny_model(), data=tiny_data())


def one_run(run: int, mode: str, no_wait: bool, root: str, timeout: float):
    out_dir = os.path.join(root, f"run-{run:03d}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--worker", out_dir, "--mode", mode] + (["--no-wait"] if no_wait else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    seconds = time.time() - t0
    signs = [s for s in ABORT_SIGNS if s in proc.stderr]
    ok = proc.returncode == 0 and not signs and os.path.exists(os.path.join(out_dir, "metrics.json"))
    return ok, seconds, proc, signs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--mode", choices=("ddp", "vocab_parallel", "both"), default="both",
                        help="both: alternate DDP and vocab-parallel runs")
    parser.add_argument("--no-wait", action="store_true", help="skip run.wait_for_peers (the barrier at exit)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--worker", metavar="OUT_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.mode, args.no_wait)
        return 0
    failures = 0
    with tempfile.TemporaryDirectory() as root:
        for run in range(args.runs):
            mode = args.mode if args.mode != "both" else ("ddp", "vocab_parallel")[run % 2]
            ok, seconds, proc, signs = one_run(run, mode, args.no_wait, root, args.timeout)
            print(f"run {run + 1:2d}/{args.runs} {mode:<14} exit {proc.returncode:4d} {seconds:6.1f} s "
                  f"{'ok' if ok else 'FAILED ' + ','.join(signs)}", flush=True)
            if not ok:
                failures += 1
                print(proc.stderr[-4000:], flush=True)
    print(f"{args.runs - failures}/{args.runs} runs started and stopped cleanly"
          + (" (without wait_for_peers)" if args.no_wait else ""), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
