"""ResNet20 training steps on a CPU: each form in each way of stepping, side by side in one run.

The ways ``dynrank-train`` can step a conv net on a CPU: ``nchw`` (fp32, the default memory layout),
``channels-last`` (fp32, what it does) and ``channels-last+bf16`` (under ``--amp``: bf16 autocast,
what the GPU runs do).  Each form — full, and SVD, Tucker, CP and TKD-CPD at ρ = 0.5 in the lowrank
form, SVD also as adapter — is one ``dynrank.train.steps.TrainStep`` (forward, label-smoothed loss,
backward, SGD with momentum) on a random CIFAR-sized batch.  The ways take turns within each of
``--repeats`` rounds; a way's time is its median step of a round (after ``--warmup`` steps), the
best round kept.  The first step's loss of every way is recorded beside its time: the ways compute
the same step, fp32 to rounding and bf16 to its precision.

    python benchmarks/cpu_steps.py --threads 2 --out benchmarks/results/cpu-steps-2026-11-26.md

writes a Markdown table (speed-up of each way over NCHW) with the host, versions and date, and the
raw numbers as JSON beside it.  The epoch-speed suite (``test_bench_epoch.py``) measures the GPU.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _bench_common import cpu_model, prepare_out  # noqa: E402
from dynrank.train.loop import cpu_bf16_native  # noqa: E402

FORMS = ("full", "lowrank-svd", "adapter-svd", "lowrank-tucker", "lowrank-cp", "lowrank-tkd-cpd")
WAYS = ("nchw", "channels-last", "channels-last+bf16")
RANK_RATIO = 0.5


def make_step(form, way, batch, seed=0):
    """A callable that takes one training step of ResNet20 in ``form``, stepped ``way``, and returns
    its loss; the model, batch and its order of random numbers depend on ``seed`` only."""
    from _bench_models import resnet20_step
    kind, _, decomposition = form.partition("-")
    step, _ = resnet20_step(kind, decomposition or "svd", RANK_RATIO, batch, channels_last=way.startswith("channels-last"),
                            amp=way.endswith("+bf16"), seed=seed)
    return lambda: float(step())


def time_step(step, steps, warmup):
    """Median seconds of ``steps`` calls after ``warmup`` calls; the first call's loss."""
    first_loss = step()
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), first_loss


def measure(forms=FORMS, ways=WAYS, batch=128, steps=8, warmup=3, repeats=2, log=print):
    """{form: {way: {"seconds": best round's median, "loss": first step's loss}}}."""
    results = {form: {} for form in forms}
    for form in forms:
        for round_ in range(repeats):
            for way in ways:
                seconds, loss = time_step(make_step(form, way, batch), steps, warmup)
                best = results[form].get(way)
                if best is None or seconds < best["seconds"]:
                    results[form][way] = dict(seconds=seconds, loss=loss)
                log(f"{form:16s} {way:20s} round {round_ + 1}/{repeats}: {seconds * 1e3:7.1f} ms")
    return results


def table(results, ways, info):
    """The Markdown report: step time per form and way, speed-up over the first way."""
    lines = [f"# ResNet20 training steps on the CPU — {info['cpu']}", "",
             f"{info['date']}; torch {info['torch']}, {info['threads']} thread(s), batch {info['batch']}, "
             f"ρ = {RANK_RATIO}; torch CPU capability: {info.get('capability')}; oneDNN native bf16: {info['bf16_native']}. Median of {info['steps']} steps after "
             f"{info['warmup']} warm-up steps, best of {info['repeats']} rounds, the ways taking turns.", "",
             "| form | " + " | ".join(f"{w} ms" for w in ways) + " | "
             + " | ".join(f"{w} speed-up" for w in ways[1:]) + " |",
             "|---" * (2 * len(ways)) + "|"]
    for form, by_way in results.items():
        base = by_way[ways[0]]["seconds"]
        lines.append(f"| {form} | " + " | ".join(f"{by_way[w]['seconds'] * 1e3:.1f}" for w in ways) + " | "
                     + " | ".join(f"{base / by_way[w]['seconds']:.2f}×" for w in ways[1:]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forms", nargs="+", default=list(FORMS), metavar="FORM",
                        help=f"of {', '.join(FORMS)} (default: all)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="the Markdown report (and .json beside it), its folder created if missing; "
                                      "default: print only")
    args = parser.parse_args(argv)
    unknown = [f for f in args.forms if f not in FORMS]
    if unknown:
        parser.error(f"--forms takes {', '.join(FORMS)}; got {', '.join(unknown)}")
    for name in ("threads", "batch", "steps", "warmup", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be ≥ 1, got {getattr(args, name)}")
    if args.out:
        if os.path.splitext(args.out)[1].lower() == ".json":
            parser.error(f"--out {args.out}: the Markdown report, whose .json goes beside it; give it another "
                         f"extension (.md)")
        prepare_out(parser, args.out)
        prepare_out(parser, os.path.splitext(args.out)[0] + ".json", "the JSON beside --out,")
    torch.set_num_threads(args.threads)
    info = dict(cpu=cpu_model(), date=datetime.date.today().isoformat(), torch=torch.__version__,
                python=platform.python_version(), threads=args.threads, batch=args.batch, steps=args.steps,
                warmup=args.warmup, repeats=args.repeats, bf16_native=cpu_bf16_native(),
                capability=torch.backends.cpu.get_cpu_capability())      # "AVX2", "AVX512", ...
    results = measure(args.forms, WAYS, args.batch, args.steps, args.warmup, args.repeats)
    report = table(results, WAYS, info)
    print(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(report)
        with open(os.path.splitext(args.out)[0] + ".json", "w", encoding="utf-8") as handle:
            json.dump(dict(info, results=results), handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
