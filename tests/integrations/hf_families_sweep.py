"""Every transformers causal-LM family through hf.patch (`make hf-families`; minutes, not run in CI).

    python tests/integrations/hf_families_sweep.py [--out FOLDER] [--lora] [MODEL_TYPE ...]

For each model type of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES (or those named), `helpers.hf_families.check_family`
on a tiny random model built from the family's default config scaled down: served (the unpatched labels= loss
and gradients, aux terms included, and the float64 objective with concepts), refused (hf.patch's error, naming
the family and why), or failed (the tiny unpatched model itself could not be built or run, or its float64 copy).
Writes FOLDER/summary.md (date, command, transformers version, one row per family). Exits 1 when any family gave
a wrong number (or the check itself crashed), 0 otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import time
import warnings

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where helpers/ lives


def main(argv=None) -> int:
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.dirname(HERE))  # this checkout's package
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    from helpers import hf_families as H

    transformers.logging.set_verbosity_error()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("types", nargs="*")
    parser.add_argument("--out", default=None)
    parser.add_argument("--lora", action="store_true", help="also the LoRA comparison on every served family")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per family")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    def on_alarm(*_):
        raise TimeoutError(f"over {args.timeout} s")

    signal.signal(signal.SIGALRM, on_alarm)
    rows, wrong = [], 0
    for kind in args.types or H.causal_lm_types():
        start = time.time()
        signal.alarm(args.timeout)
        try:
            r = H.check_family(kind, lora=args.lora)
        except H.WrongNumbers as err:
            r, wrong = H.Result(kind, "WRONG", str(err)), wrong + 1
        except TimeoutError as err:
            r = H.Result(kind, "failed", f"timeout: {err}")
        except Exception as err:  # the check crashed after patching: counted with the wrong numbers
            r, wrong = H.Result(kind, "ERROR", f"{type(err).__name__}: {H._short(err)}"), wrong + 1
        finally:
            signal.alarm(0)
        rows.append((r, time.time() - start))
        print(f"{kind:28s} {time.time() - start:6.1f}s {r.status:8s} {r.reason or r.checks}", flush=True)
    counts = {s: sum(r.status == s for r, _ in rows) for s in ("served", "refused", "failed", "WRONG", "ERROR")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    print(summary)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(f"# hf.patch over every causal-LM family\n\n"
                    f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n"
                    f"- command: `{' '.join(['python', 'tests/integrations/hf_families_sweep.py', *(argv or sys.argv[1:])])}`\n"
                    f"- transformers {transformers.__version__}, torch {torch.__version__}, CPU float32 "
                    f"(float64 oracle)\n- {len(rows)} model types: {summary}\n\n"
                    "served: labels= loss and every gradient equal the unpatched model's (rel 1e-5 / 1e-4), aux "
                    "loss included where the family has one; concepts= equals the float64 documented objective plus "
                    "the family's extra terms. refused: hf.patch's error. failed: the tiny unpatched model (built "
                    "from the default config scaled down) could not be built or run, or its float64 copy.\n\n"
                    "| model type | status | seconds | detail |\n|---|---|---|---|\n")
            for r, seconds in rows:
                detail = (r.reason or r.checks).replace("|", "/").replace("\n", " ")
                f.write(f"| {r.model_type} | {r.status} | {seconds:.1f} | {detail} |\n")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
