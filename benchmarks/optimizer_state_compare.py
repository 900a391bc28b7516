"""Which optimizer state to keep at a form change: "reset", "carry" or "fresh"?

A plain script (not a pytest file):

    python benchmarks/optimizer_state_compare.py [--seeds 3] [--epochs 12]

Task: synthetic but learnable classification — labels from a random teacher
network (MLP on 16-d Gaussian inputs; small CNN on 3×8×8 Gaussian images),
a student converted with ``convert_model(rank_ratio=0.25)`` and trained
lowrank → full → adapter with DynamicRankScheduler at I = E/3, D = 2E/3.
Two optimizers, each with its usual schedule: SGD (momentum 0.9, lr ×0.1 at
E/2, like the paper's) and AdamW (cosine).  Per setting and seed, the
policies see the same initialization, data order and fresh adapter factors;
only the optimizer state after a switch differs: "reset" empties the new
parameters' state, "carry" maps the old parameters' state onto them, "fresh"
empties every parameter's (the authors' fresh optimizer per phase).

Reported per (model, optimizer, policy): final training loss, held-out loss
and accuracy (mean ± std over seeds), and the mean training loss of the first
epoch after each switch (how much the switch disrupts training).
"""

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

from dynrank.convert import convert_model
from dynrank.scheduler import OPTIMIZER_STATES, DynamicRankScheduler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import at_least  # noqa: E402

MODELS = ("mlp", "cnn")     # the teacher-student tasks: MLP on 16-d vectors, CNN on 3×8×8 images


def teacher_data(kind, seed, n_train=4096, n_test=2048):
    if kind not in MODELS:
        raise ValueError(f"kind must be one of {', '.join(MODELS)}, got {kind!r}")
    g = torch.Generator().manual_seed(10_000 + seed)
    if kind == "mlp":
        x = torch.randn(n_train + n_test, 16, generator=g)
        w1, w2 = torch.randn(16, 16, generator=g) / 4, torch.randn(16, 10, generator=g)
        logits = torch.tanh(x @ w1 * 2) @ w2
    else:
        x = torch.randn(n_train + n_test, 3, 8, 8, generator=g)
        k = torch.randn(16, 3, 3, 3, generator=g) / 3
        h = torch.tanh(F.conv2d(x, k, padding=1)).mean(dim=(2, 3))
        logits = h @ torch.randn(16, 10, generator=g) * 3
    y = logits.argmax(dim=1)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def student(kind):
    if kind not in MODELS:
        raise ValueError(f"kind must be one of {', '.join(MODELS)}, got {kind!r}")
    if kind == "mlp":
        return nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 48, 3, padding=1, stride=2), nn.BatchNorm2d(48), nn.ReLU(),
                         nn.Conv2d(48, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))


def run(kind, opt_name, policy, seed, epochs, batch=128):
    (x, y), (xt, yt) = teacher_data(kind, seed)
    torch.manual_seed(seed)
    model = student(kind)
    convert_model(model, rank_ratio=0.25, init="fresh")
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        lr_sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 2], 0.1)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
        lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    inflate, deflate = epochs // 3, 2 * epochs // 3
    sched = DynamicRankScheduler(model, opt, inflate, deflate, optimizer_state=policy)
    order = torch.Generator().manual_seed(seed)
    epoch_loss = []
    for epoch in range(epochs):
        sched.step(epoch)
        model.train()
        perm = torch.randperm(x.shape[0], generator=order)
        total = 0.0
        for i in range(0, x.shape[0], batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
        epoch_loss.append(total / x.shape[0])
        lr_sched.step()
    model.eval()
    with torch.no_grad():
        logits = model(xt)
        acc = (logits.argmax(1) == yt).float().mean().item()
        test_loss = F.cross_entropy(logits, yt).item()
    return {"final_loss": epoch_loss[-1], "acc": acc, "test_loss": test_loss, "after_inflate": epoch_loss[inflate],
            "after_deflate": epoch_loss[deflate]}


def _models(text):
    """``--models``: a comma-separated list of MODELS."""
    kinds = text.split(",")
    unknown = [kind for kind in kinds if kind not in MODELS]
    if unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(MODELS)}, got {text!r}")
    return kinds


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=at_least(1), default=3)
    parser.add_argument("--epochs", type=at_least(3, why=" (lowrank, full and adapter epochs: I = E/3, D = 2E/3)"),
                        default=12)
    parser.add_argument("--models", type=_models, default=list(MODELS), help="comma-separated: mlp, cnn")
    parser.add_argument("--threads", type=at_least(1), default=1,
                        help="intra-op threads (1: these models are too small to gain from more)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, epochs={args.epochs}, "
          f"seeds={args.seeds}")
    header = f"{'model':5} {'opt':6} {'policy':6} {'final train loss':>17} {'test loss':>17} " \
             f"{'test acc':>15} {'loss ep. I':>10} {'loss ep. D':>10}"
    print(header)
    print("-" * len(header))
    wins = {}
    for kind in args.models:
        for opt_name in ("sgd", "adamw"):
            results = {}
            for policy in OPTIMIZER_STATES:
                start = time.perf_counter()
                rs = [run(kind, opt_name, policy, seed, args.epochs) for seed in range(args.seeds)]
                results[policy] = rs
                fl, acc = mean_std([r["final_loss"] for r in rs]), mean_std([r["acc"] for r in rs])
                tl = mean_std([r["test_loss"] for r in rs])
                ai = statistics.mean(r["after_inflate"] for r in rs)
                ad = statistics.mean(r["after_deflate"] for r in rs)
                print(f"{kind:5} {opt_name:6} {policy:6} {fl[0]:9.4f} ± {fl[1]:.4f} {tl[0]:9.4f} ± {tl[1]:.4f} "
                      f"{acc[0]:8.4f} ± {acc[1]:.3f} "
                      f"{ai:10.4f} {ad:10.4f}   ({time.perf_counter() - start:.1f} s)")
            for policy in OPTIMIZER_STATES:
                if policy != "reset":
                    wins[(kind, opt_name, policy)] = [
                        sum(c[key] < r[key] for c, r in zip(results[policy], results["reset"]))
                        for key in ("final_loss", "test_loss")]
    print("\nagainst reset, the default:")
    for (kind, opt_name, policy), (train_wins, test_wins) in wins.items():
        print(f"{kind}/{opt_name}: {policy} has the lower final train loss in {train_wins} of {args.seeds} seeds, "
              f"the lower test loss in {test_wins}")


if __name__ == "__main__":
    main()
