"""``dynrank-train``: train full, low-rank and dynamic-rank models from the command line.

With no arguments it runs the main job: a small byte-level transformer LM on
Python's own standard-library sources, trained full rank, fixed low rank and
dynamic rank (low rank → full → adapter), then a side-by-side table and the
RankMonitor files and plots under ``runs/<timestamp>``.  Flags select the
paper's experiments (``--preset cifar10-resnet20`` …) or any mix of model,
data and schedule; see ``dynrank-train --help``.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time

__all__ = ["main", "build_parser", "config_from_args", "PRESETS", "MAIN_JOB"]

# Table 7 of the paper (SGD, momentum 0.9, lr 0.1, ρ = 0.5), plus the authors'
# label smoothing on CIFAR-10 and WRN dropout 0.3.
PRESETS = {
    "cifar10-resnet20": dict(model="resnet20", data="cifar10", batch_size=128, lr=0.1, epochs=150,
                             milestones=[100, 130], inflate_epoch=55, deflate_epoch=120, weight_decay=1e-4,
                             rank_ratio=0.5, label_smoothing=0.1, optimizer="sgd", warmup_steps=0),
    "cifar100-wrn28-10": dict(model="wrn28-10", data="cifar100", batch_size=128, lr=0.1, epochs=200,
                              milestones=[150, 180], inflate_epoch=80, deflate_epoch=170, weight_decay=5e-4,
                              rank_ratio=0.5, label_smoothing=0.0, optimizer="sgd", dropout=0.3, warmup_steps=0),
    "tiny-imagenet-resnet50": dict(model="resnet50", data="tiny-imagenet", batch_size=64, lr=0.1, epochs=100,
                                   milestones=[70, 90], inflate_epoch=30, deflate_epoch=80, weight_decay=5e-4,
                                   rank_ratio=0.5, label_smoothing=0.0, optimizer="sgd", warmup_steps=0),
}

# The main job: sized to finish in a few minutes on a 2-core CPU, with the
# full-rank phase straddling the LR decay as the paper prescribes.
MAIN_JOB = dict(model="gpt", data="stdlib", schedule="compare", batch_size=32, lr=3e-3, epochs=8,
                milestones=[5, 7], inflate_epoch=3, deflate_epoch=7, weight_decay=0.1, rank_ratio=0.5,
                label_smoothing=0.0, optimizer="adamw", warmup_steps=50, context=64, dim=128, depth=2, heads=4,
                steps_per_epoch=120, dropout=0.0)

DATA_PRESET = {"cifar10": PRESETS["cifar10-resnet20"], "cifar100": PRESETS["cifar100-wrn28-10"],
               "tiny-imagenet": PRESETS["tiny-imagenet-resnet50"], "stdlib": MAIN_JOB}
MODEL_DATA = {"resnet20": "cifar10", "wrn28-10": "cifar100", "resnet50": "tiny-imagenet", "gpt": "stdlib"}
DATA_MODEL = {data: model for model, data in MODEL_DATA.items()}
GENERIC = dict(schedule="dynamic", decomposition="svd", seed=0, device="auto", lr_decay=0.1, deflate_init="zeros",
               optimizer_state="reset", width=1.0, metrics_every=1, context=128, dim=128, depth=2, heads=4,
               steps_per_epoch=None, dropout=None, data_dir="data", compile=False, compile_mode="default",
               cuda_graphs=False, alpha=None)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# torch.finfo(torch.float32).max: the largest --alpha a float32 layer takes (the scale alpha/rank at rank 1).
FLOAT32_MAX = 3.4028234663852886e38


_EPILOG = """\
settings are resolved as: flags, then --preset, then the data set's defaults (its Table 7
row; for stdlib the main job), then generic ones.  Changing --epochs rescales the preset's
LR milestones; I and D then follow the paper's rule (schedule_from_lr, φ = 0.5) unless given.

examples:
  dynrank-train                                            the main job
  dynrank-train --preset cifar10-resnet20 --data-dir data --schedule compare
  dynrank-train --preset cifar100-wrn28-10 --data-dir data --decomposition tucker
  dynrank-train --data cifar10 --download --epochs 30 --full-rank-fraction 0.3
  dynrank-train --resume runs/20250101-120000              continue after Ctrl-C
"""


def _int_list(text):
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 100,130, got {text!r}") from None


def build_parser():
    """The argparse parser of ``dynrank-train``."""
    p = argparse.ArgumentParser(
        prog="dynrank-train",
        description="Dynamic-rank training. With no arguments: the main job (a byte-level GPT on the Python "
                    "standard library trained full rank, fixed low rank and dynamic rank; a few minutes on a CPU).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--preset", choices=sorted(PRESETS), help="the paper's Table 7 settings for one data set")
    g.add_argument("--model", choices=("resnet20", "wrn28-10", "resnet50", "gpt"))
    g.add_argument("--data", choices=("cifar10", "cifar100", "tiny-imagenet", "stdlib"),
                   help="stdlib: Python's own standard-library sources as bytes (no download)")
    g.add_argument("--data-dir", help="folder holding the data set (default: ./data; saved as an absolute path); "
                                      "on --resume, where the run's data set is now")
    g.add_argument("--download", action="store_true", help="fetch the official archive into --data-dir")
    g.add_argument("--cache-dir", help="keep decoded image trees here (default: ~/.cache/dynrank)")
    g = p.add_argument_group("schedule")
    g.add_argument("--schedule", choices=("full", "lowrank", "dynamic", "compare"),
                   help="compare: train full, lowrank and dynamic and print a table (default: dynamic; "
                        "compare for the main job)")
    g.add_argument("--rank-ratio", type=float,
                   help="ρ, factor rank / weight rank (convs: int(ρ·out_channels), the authors' rule; "
                        "GPT linears: int(ρ·min(in, out)))")
    g.add_argument("--decomposition", choices=("svd", "tucker", "cp", "tkd-cpd"),
                   help="for convolutions (vision models; the GPT's linears always use svd)")
    g.add_argument("--inflate-epoch", type=int, help="I: lowrank → full")
    g.add_argument("--deflate-epoch", type=int, help="D: full → adapter")
    g.add_argument("--full-rank-fraction", type=float,
                   help="φ in (0, 1]: choose I, D with φ·E full-rank epochs around the first LR decay (not with "
                        "both --inflate-epoch and --deflate-epoch)")
    g.add_argument("--deflate-init", choices=("zeros", "random", "svd"))
    g.add_argument("--optimizer-state", choices=("carry", "reset", "fresh"),
                   help="optimizer state across a form change: reset (default) empties the new parameters' state, "
                        "the others keep theirs; fresh empties every parameter's, as a new optimizer per phase "
                        "(the authors' fresh SGD per phase); carry maps the old parameters' state onto the new")
    g.add_argument("--alpha", type=float,
                   help="adapter and low-rank scale numerator, the factorized term scaled by alpha/rank (a finite "
                        "number > 0; default: scale 1). The paper's adapters use alpha 16 with svd; the presets "
                        "leave it out")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int)
    g.add_argument("--milestones", type=_int_list, help="LR decay epochs, increasing, e.g. 100,130")
    g.add_argument("--lr", type=float)
    g.add_argument("--lr-decay", type=float, help="LR factor at each milestone, in (0, 1] (default 0.1)")
    g.add_argument("--warmup-steps", type=int, help="linear LR warm-up steps")
    g.add_argument("--optimizer", choices=("sgd", "adamw"))
    g.add_argument("--batch-size", type=int)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--dropout", type=float, help="WRN / GPT dropout, in [0, 1) (not for resnet20/resnet50)")
    g.add_argument("--seed", type=int, help="in [0, 2**63)")
    g = p.add_argument_group("GPT size (--model gpt only; refused with a vision model)")
    g.add_argument("--dim", type=int, help="model width, divisible by --heads (≥ 8 but with --schedule full: "
                                           "narrower leaves no layer to factorize)")
    g.add_argument("--depth", type=int)
    g.add_argument("--heads", type=int)
    g.add_argument("--context", type=int)
    g.add_argument("--steps-per-epoch", type=int, help="batches per epoch, ≥ 1 (default: one pass)")
    g = p.add_argument_group("running")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available); on --resume the "
                                    "saved --threads and --amp stay unless given (--amp takes the new device's "
                                    "default where the device type changes, with a note)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction,
                   help="bf16 autocast (default: on with CUDA; on a CPU with AVX-512 BF16 or AMX it speeds "
                        "conv nets up too, on one without it slows them down several times)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    g.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile mode (implies --compile); reduce-overhead replays CUDA graphs, for "
                        "small launch-bound models such as ResNet20 at batch 128")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                   help="capture each training step (forward, backward, SGD step) as a CUDA graph and replay it: "
                        "one launch per batch instead of hundreds, for launch-bound models such as ResNet20 "
                        "(CUDA and SGD only; not with --compile)")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default 1: the built-in models at CPU sizes run fastest on one, "
                        "and the same thread count gives the same losses on every rerun)")
    g.add_argument("--out", help="output folder, which must not hold a run already (continue one with --resume) "
                                 "(default: a new runs/<timestamp>, suffixed -2, -3, ... if taken)")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR (its saved settings are used; a config.json edited against the "
                        "settings its schedules trained with, finished ones included, is refused)")
    g.add_argument("--metrics-every", type=int, help="measure λ every this many epochs (≥ 1)")
    g.add_argument("--width", type=float, help="channel multiplier of vision models, > 0 (quick tests only; "
                                                 "each layer keeps at least 1 channel; one that leaves no layer "
                                                 "to factorize is refused but with --schedule full)")
    p.set_defaults(**{k: None for k in ("compile", "amp", "cuda_graphs")})
    return p


# How a run executes and where its data lives, not its settings (model, data, schedule): a resumed run
# may change these.  They may change the arithmetic (--amp's bf16 autocast; another device or thread
# count rounds differently); --data-dir is for data that moved, or a run resumed from another folder.
RESUME_OVERRIDES = ("amp", "threads", "compile", "compile_mode", "cuda_graphs", "cache_dir", "data_dir")
# Folders a run keeps as absolute paths, so that it resumes from any working directory.
FOLDERS = ("data_dir", "cache_dir")


def _explicit(args):
    return {k: v for k, v in vars(args).items() if v is not None}


def _absolute_folders(cfg):
    """Make the data folders of an image data set's run (:data:`FOLDERS`) absolute, in place (the
    stdlib text reads none)."""
    if cfg.get("data") != "stdlib":
        for key in FOLDERS:
            if cfg.get(key):
                cfg[key] = os.path.abspath(cfg[key])
    return cfg


def config_from_args(args, notes=None):
    """Resolve flags, preset and per-data-set defaults into one configuration dict.

    Order: explicit flags, then ``--preset``, then the defaults of the data
    set (its Table 7 row, or the main job for ``stdlib``), then generic ones.

    The data folders of an image data set (``data_dir``, ``cache_dir``) are stored as absolute paths, so
    ``--resume`` finds them from any working directory.

    ``dropout`` is the one the model trains with (:func:`~dynrank.train.models.model_dropout`): the
    WRN's 0.3 unless given, None for a model without dropout.

    Flags the run accepts but does not use (see :func:`_unused_notes`: the form-change flags with
    ``--schedule full``/``lowrank``, ``--rank-ratio``, ``--decomposition`` and ``--alpha`` with
    ``--schedule full``, the data-folder flags with ``--data stdlib``, ``--compile-mode`` with
    ``--no-compile``) are named in ``notes`` (a list, when given).

    Raises:
        ValueError: inconsistent settings, a value out of range, or a model size that leaves a
            lowrank or dynamic run no layer to factorize (message says which).
    """
    from ..schedules import schedule_from_lr
    from .models import model_dropout
    given = _explicit(args)
    preset = PRESETS[given["preset"]] if "preset" in given else {}
    model = given.get("model", preset.get("model"))
    data = given.get("data", preset.get("data"))
    if data is None:
        data = MODEL_DATA[model] if model else "stdlib"
    if model is None:
        model = DATA_MODEL[data]
    base = DATA_PRESET[data]
    cfg = dict(GENERIC)
    cfg.update(base)
    cfg.update(preset)
    cfg.update(given)
    cfg.update(model=model, data=data)
    if "compile_mode" in given and given.get("compile") is not False:
        cfg["compile"] = True
    for key in ("context", "dim", "depth", "heads", "steps_per_epoch"):
        if model != "gpt" and key in base and key not in given:
            cfg[key] = GENERIC[key]
    # The one the model trains with: the data set's row may be another model's (cifar100's, the WRN's).
    cfg["dropout"] = model_dropout(model, cfg["dropout"])
    if (model == "gpt") != (data == "stdlib"):
        raise ValueError(f"--model {model} cannot train on --data {data}: the GPT reads the stdlib text, "
                         f"the vision models read cifar10, cifar100 or tiny-imagenet")
    epochs = cfg["epochs"]
    reference = preset or base
    if "milestones" not in given and epochs != reference["epochs"]:
        # Keep the decays at the same fractions of a shorter or longer run.
        cfg["milestones"] = sorted({max(1, round(m * epochs / reference["epochs"])) for m in reference["milestones"]
                                    if round(m * epochs / reference["epochs"]) < epochs})
        if not cfg["milestones"] and epochs >= 2:
            cfg["milestones"] = [epochs // 2]
    _check_flags(given, model)
    if notes is not None:
        notes.extend(_unused_notes(given, cfg))
    _check_values(cfg)
    bad = [m for m in cfg["milestones"] if not 0 < m < epochs]
    if bad:
        raise ValueError(f"--milestones must lie in (0, epochs={epochs}), got {cfg['milestones']}")
    if any(a >= b for a, b in zip(cfg["milestones"], cfg["milestones"][1:])):
        raise ValueError(f"--milestones must be increasing, each epoch once (a repeated one would cut the LR "
                         f"twice), got {','.join(map(str, cfg['milestones']))}")
    same_schedule = epochs == reference["epochs"] and cfg["milestones"] == reference["milestones"]
    if "inflate_epoch" in given and "deflate_epoch" in given:
        inflate, deflate = given["inflate_epoch"], given["deflate_epoch"]
    elif same_schedule and "full_rank_fraction" not in given:
        inflate, deflate = reference["inflate_epoch"], reference["deflate_epoch"]
    elif not cfg["milestones"] and cfg["schedule"] in ("full", "lowrank"):
        inflate, deflate = 0, epochs        # a single-form run: no switch to place
    elif not cfg["milestones"]:
        raise ValueError("without LR milestones there is no decay to place the full-rank phase around; "
                         "give --inflate-epoch and --deflate-epoch")
    else:
        inflate, deflate = schedule_from_lr(epochs, milestones=cfg["milestones"],
                                            full_rank_fraction=given.get("full_rank_fraction", 0.5))
    cfg["inflate_epoch"] = given.get("inflate_epoch", inflate)
    cfg["deflate_epoch"] = given.get("deflate_epoch", deflate)
    if not 0 <= cfg["inflate_epoch"] < cfg["deflate_epoch"] <= epochs:
        derived = [f"{name}={cfg[key]}" for name, key in (("I", "inflate_epoch"), ("D", "deflate_epoch"))
                   if key not in given]
        how = ""
        if derived:
            source = ("the data set's defaults" if same_schedule and "full_rank_fraction" not in given
                      else f"the paper's rule from epochs={epochs}, milestones={cfg['milestones']}")
            how = (f" ({' and '.join(derived)} derived by {source}; give "
                   + " and ".join(f"--{k.replace('_', '-')}" for k in ("inflate_epoch", "deflate_epoch")
                                  if k not in given) + ")")
        raise ValueError(f"need 0 ≤ inflate epoch < deflate epoch ≤ epochs, got I={cfg['inflate_epoch']}, "
                         f"D={cfg['deflate_epoch']}, epochs={epochs}{how}")
    if cfg["deflate_epoch"] == epochs:
        cfg["deflate_epoch"] = None  # stays full to the end
    cfg.pop("preset", None)
    cfg.pop("resume", None)
    _check_factorizable(cfg)
    return _absolute_folders(cfg)


# Which model reads which size flag (build_model, load_data): any other model ignores it.
GPT_ONLY = ("dim", "depth", "heads", "context", "steps_per_epoch")
VISION_ONLY = ("width", "decomposition")
DROPOUT_MODELS = ("wrn28-10", "gpt")


def _flag(key):
    return "--" + key.replace("_", "-")


def _ignoring(why, given, keys):
    """``note: <why>; ignoring --a, --b NAME`` for those of ``keys`` given (a name or path with its value),
    or None where none is."""
    flags = [f"{_flag(k)} {given[k]}" if isinstance(given[k], str) else _flag(k)
             for k in keys if k in given and given[k] is not False]
    return f"note: {why}; ignoring {', '.join(flags)}" if flags else None


def _unused_notes(given, cfg):
    """A note for each group of flags that ``cfg``'s run accepts but does not use.

    Harmless, so not refused (unlike the flags of :func:`_check_flags`), but not silent either.
    """
    rules = ((cfg["schedule"] in ("full", "lowrank"), f"--schedule {cfg['schedule']} does not switch forms",
              ("inflate_epoch", "deflate_epoch", "full_rank_fraction", "deflate_init", "optimizer_state")),
             (cfg["schedule"] == "full", "--schedule full trains the dense model (no layer is factorized)",
              ("rank_ratio", "decomposition", "alpha")),
             (cfg["data"] == "stdlib", "--data stdlib reads Python's own sources (no data folder, no download)",
              ("data_dir", "download", "cache_dir")),
             (given.get("compile") is False, "--no-compile", ("compile_mode",)))
    notes = (_ignoring(why, given, keys) for applies, why, keys in rules if applies)
    return [note for note in notes if note]


def _check_flags(given, model):
    """Refuse flags the chosen model or schedule would ignore without a word."""
    for key in GPT_ONLY if model != "gpt" else VISION_ONLY:
        if key == "decomposition" and given.get(key) == "svd":
            continue                      # the GPT's factorization: asking for it is not a mistake
        if key in given:
            users = "--model gpt" if model != "gpt" else "the vision models (resnet20, wrn28-10, resnet50)"
            raise ValueError(f"{_flag(key)} is used by {users} only, not by --model {model}")
    if "dropout" in given and model not in DROPOUT_MODELS:
        raise ValueError(f"--dropout is used by --model wrn28-10 and gpt only; {model} has no dropout")
    if "full_rank_fraction" in given and "inflate_epoch" in given and "deflate_epoch" in given:
        raise ValueError("--full-rank-fraction chooses I and D, and --inflate-epoch and --deflate-epoch give them; "
                         "give one or the other")


def _check_values(cfg):
    """Each numeric setting in its range, as a ``--flag must be …, got …`` ValueError."""
    def need(key, ok, what):
        value = cfg.get(key)
        if value is not None and not ok(value):
            raise ValueError(f"{_flag(key)} must be {what}, got {value}")
    finite = lambda v: isinstance(v, int) or math.isfinite(v)
    for key in ("epochs", "batch_size", "steps_per_epoch", "threads", "metrics_every", "dim", "depth", "heads",
                "context"):
        need(key, lambda v: v >= 1, "≥ 1")
    need("rank_ratio", lambda v: 0.0 < v <= 1.0, "in (0, 1]")
    need("lr", lambda v: finite(v) and v > 0, "a finite number > 0")
    need("lr_decay", lambda v: finite(v) and 0 < v <= 1, "a factor in (0, 1] (0.1 divides the LR by 10)")
    need("weight_decay", lambda v: finite(v) and v >= 0, "a finite number ≥ 0")
    need("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)")
    need("dropout", lambda v: 0 <= v < 1, "in [0, 1)")
    need("warmup_steps", lambda v: v >= 0, "≥ 0")
    need("width", lambda v: finite(v) and v > 0, "a finite number > 0 (channels round to at least 1)")
    need("alpha", lambda v: finite(v) and 0 < v <= FLOAT32_MAX,
         "a finite number > 0 (at most float32's largest, 3.4e38: the scale at rank 1)")
    need("full_rank_fraction", lambda v: 0 < v <= 1, "in (0, 1]")
    need("seed", lambda v: 0 <= v < 2 ** 63, "in [0, 2**63)")
    if cfg["model"] == "gpt" and cfg["dim"] % cfg["heads"]:
        raise ValueError(f"--dim must be divisible by --heads, got dim={cfg['dim']}, heads={cfg['heads']}")


def _check_factorizable(cfg, resume=False):
    """Refuse a model size that leaves ``cfg``'s lowrank or dynamic runs no layer to factorize, as a
    ValueError naming the size and ``convert_model``'s min_features.

    ``convert_model`` would find so only when the first converted run starts: in a compare job, after
    the full run has trained.  ``resume``: the size is a run's saved one, which only a new run changes.
    """
    if cfg["schedule"] == "full":
        return
    from .data import DATASETS
    from .loop import MIN_FEATURES, factorized_layers
    classes = 256 if cfg["data"] == "stdlib" else DATASETS[cfg["data"]]["classes"]
    if factorized_layers(cfg, classes):
        return
    size = "dim" if cfg["model"] == "gpt" else "width"
    how = "start a new run (--out) with" if resume else "use"
    raise ValueError(f"{_flag(size)} {cfg.get(size, GENERIC[size]):g} leaves no layer of {cfg['model']} whose weight "
                     f"has both sides ≥ convert_model's min_features={MIN_FEATURES}, so --schedule "
                     f"{cfg['schedule']} has nothing to factorize; {how} --schedule full or a larger {_flag(size)}")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What a saved config.json holds: each setting's check and its words.  A resume reads the required
# ones directly (the GPT's size too, with --model gpt); the others are checked where present.
_INT, _NUMBER = (_is_int, "an integer"), (_is_number, "a number")
_TEXT, _BOOL = (lambda v: isinstance(v, str), "a string"), (lambda v: isinstance(v, bool), "true or false")
_EPOCH_LIST = (lambda v: isinstance(v, list) and all(map(_is_int, v)), "a list of integers")


def _or_null(kind):
    return (lambda v: v is None or kind[0](v)), f"{kind[1]} or null"


_SAVED_REQUIRED = dict(
    model=_TEXT, data=_TEXT, schedule=_TEXT, rank_ratio=_NUMBER, decomposition=_TEXT, inflate_epoch=_INT,
    deflate_epoch=_or_null(_INT), deflate_init=_TEXT, optimizer_state=_TEXT, epochs=_INT, milestones=_EPOCH_LIST,
    lr=_NUMBER, lr_decay=_NUMBER, optimizer=_TEXT, batch_size=_INT, weight_decay=_NUMBER, label_smoothing=_NUMBER,
    seed=_INT, metrics_every=_INT, device=_TEXT)
_SAVED_GPT_SIZE = dict(context=_INT, dim=_INT, depth=_INT, heads=_INT)
_SAVED_OPTIONAL = dict(
    warmup_steps=_INT, dropout=_or_null(_NUMBER), width=_NUMBER, steps_per_epoch=_or_null(_INT),
    threads=_or_null(_INT), amp=_or_null(_BOOL), compile=_BOOL, compile_mode=_TEXT, cuda_graphs=_or_null(_BOOL),
    alpha=_or_null(_NUMBER), channels_last=_BOOL, download=_BOOL, data_dir=_or_null(_TEXT), cache_dir=_or_null(_TEXT),
    resumes=(lambda v: isinstance(v, list), "a list"))


def _check_saved(cfg, path):
    """Refuse a run's saved settings ``cfg`` (read from ``path``) that miss a setting a resume reads or
    hold one of the wrong type or an unknown choice, as a one-line RunFileError naming the file and key."""
    from .loop import RunFileError
    choices = {action.dest: action.choices for action in build_parser()._actions if action.choices}
    required = {**_SAVED_REQUIRED, **(_SAVED_GPT_SIZE if cfg.get("model") == "gpt" else {})}
    for key, (ok, what) in {**required, **_SAVED_GPT_SIZE, **_SAVED_OPTIONAL}.items():
        if key not in cfg:
            if key in required:
                raise RunFileError(f"{path} is damaged (missing {key!r})")
            continue
        value = cfg[key]
        if not ok(value):
            raise RunFileError(f"{path} is damaged ({key!r} must be {what}, got {json.dumps(value)})")
        if key in choices and value not in choices[key]:
            raise RunFileError(f"{path} is damaged ({key!r} must be one of {', '.join(choices[key])}, "
                               f"got {json.dumps(value)})")


def _note_resume(saved, cfg):
    """Keep in ``cfg["resumes"]`` what a resume changed of how the run executes (device, AMP, ...).

    config.json holds the settings the run goes on with; ``resumes`` lists, per resume, each
    setting it changed as [before, after], so how the run began stays on record.  The epoch
    records name their device.
    """
    changed = {k: [saved.get(k), v] for k, v in cfg.items() if k != "resumes" and saved.get(k) != v}
    if changed:
        cfg["resumes"] = list(saved.get("resumes", [])) + [
            dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), changed=changed)]


def _check_device(device, saved_in=None):
    """``device`` ("auto", "cpu", "cuda", "cuda:N") as the device string to train on; ValueError if unusable.

    ``saved_in``: the run folder whose saved device this is (a resume without ``--device``); the
    errors then name the saved device, not a flag, and say how to resume on the CPU.
    """
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        what = f"{os.path.join(saved_in, 'config.json')}'s device" if saved_in else "--device"
        raise ValueError(f"{what} must be cpu, cuda or cuda:N (lower case), got {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            problem = f"torch sees no GPU (torch {torch.__version__})"
        elif parsed.index is not None and parsed.index >= torch.cuda.device_count():
            problem = f"torch sees {torch.cuda.device_count()} GPU(s)"
        else:
            return device
        if saved_in:
            raise ValueError(f"the run was saved with device {device}, but {problem}; continue it on the CPU "
                             f"with --resume {saved_in} --device cpu")
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} asked for CUDA, but {problem}")
        raise ValueError(f"--device {device}: {problem}")
    return device


def _default_amp(device):
    """``--amp``'s default on ``device`` (a checked device string): on with a CUDA GPU that has bf16."""
    import torch
    return bool(device.startswith("cuda") and torch.cuda.is_bf16_supported())


def _device_type(device):
    return device.split(":")[0]


def _resume_amp(saved, cfg, amp_given):
    """On a resume to another device type, ``--amp``'s default there, unless ``--amp``/``--no-amp`` was given.

    ``cfg`` is resolved (:func:`_resolve_device`) and keeps the saved setting; a resume on the same
    device type keeps it (a CPU run's ``--amp`` stays on).  A value chosen on the other type (on by
    default with CUDA) gives way to the new device's default; a note says so where that changes it.
    Returns the note or None.
    """
    before, after = saved.get("device"), cfg["device"]
    if amp_given or not before or _device_type(before) == _device_type(after):
        return None
    amp = _default_amp(after)
    if amp == cfg["amp"]:
        return None
    cfg["amp"] = amp
    flag = lambda on: "--amp" if on else "--no-amp"
    return (f"note: the run trained with {flag(not amp)} on {before}; on {after} it goes on with that device's "
            f"default, {flag(amp)} (give {flag(not amp)} to keep the run's)")


def _resolve_device(cfg, saved_in=None):
    import torch
    device = _check_device(cfg["device"], saved_in)
    cfg["device"] = device
    cuda = device.startswith("cuda")
    if not cuda:
        threads = cfg.get("threads") or 1
        torch.set_num_threads(threads)
        cfg["threads"] = threads
    if cfg.get("amp") is None:
        cfg["amp"] = _default_amp(device)
    from .loop import trains_channels_last
    cfg["channels_last"] = trains_channels_last(cfg["model"], device, cfg.get("width", 1.0))
    if cuda:
        # Fixed input shapes: let cuDNN time its algorithms once per shape and keep the fastest.
        torch.backends.cudnn.benchmark = True
    if cfg.get("cuda_graphs"):
        if not cuda:
            raise ValueError(f"--cuda-graphs needs a CUDA device, got --device {device}")
        if cfg.get("compile"):
            raise ValueError("--cuda-graphs and --compile are alternatives (torch.compile's reduce-overhead mode "
                             "makes its own graphs); give one of them")
        if cfg["optimizer"] != "sgd":
            raise ValueError(f"--cuda-graphs captures the SGD step; got --optimizer {cfg['optimizer']}")
    return cfg


SCHEDULE_DIRS = ("full", "lowrank", "dynamic")
# Settings a resume may find changed in config.json against the checkpoint's copy: the overrides and
# what a resume records or re-derives (--device, its AMP default and memory layout, the resumes list,
# a --download it was given).
RESUME_BOOKKEEPING = (*RESUME_OVERRIDES, "device", "amp", "channels_last", "resumes", "download")


def _holds_run(folder):
    """The first file showing that ``folder`` holds a dynrank-train run, or None."""
    candidates = [os.path.join(folder, "config.json"), os.path.join(folder, "checkpoint.pt")]
    for schedule in SCHEDULE_DIRS:
        candidates += [os.path.join(folder, schedule, name) for name in ("checkpoint.pt", "result.json")]
    return next((path for path in candidates if os.path.exists(path)), None)


def _file_in_the_way(folder):
    """The file at or above ``folder`` that keeps it from being a directory, or None."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return None if os.path.isdir(path) else path


def _claim_out_dir(folder):
    """Create ``folder``'s config.json exclusively; False where it exists (another run holds the folder).

    The check of :func:`_holds_run` comes first, with its message; this closes the gap after it, where
    two runs started together on one ``--out`` would both pass and then write into each other.
    """
    os.makedirs(folder, exist_ok=True)
    try:
        os.close(os.open(os.path.join(folder, "config.json"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _new_run_dir(root="runs"):
    """A new, empty ``runs/<timestamp>`` folder, suffixed -2, -3, ... where runs start in the same second."""
    os.makedirs(root, exist_ok=True)
    base = os.path.join(root, time.strftime("%Y%m%d-%H%M%S"))
    for n in range(1, 10000):
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(path)      # exclusive: of two runs racing for one name, one gets the next suffix
        except FileExistsError:
            continue
        return path
    raise RuntimeError(f"no free run folder next to {base}")


def _trained_settings(out_dir, schedule):
    """(settings, file) a schedule of the run in ``out_dir`` trained with, or (None, None) before its first
    checkpoint.

    A finished schedule's result.json holds them (its checkpoint may be gone: it is not trained from
    again); one written before result.json held them leaves its checkpoint's, where that still loads.
    An unfinished schedule's checkpoint holds them. Damaged files it must read raise RunFileError.
    """
    from .loop import RunFileError, load_checkpoint, read_result
    result = os.path.join(out_dir, schedule, "result.json")
    checkpoint = os.path.join(out_dir, schedule, "checkpoint.pt")
    if os.path.isfile(result):
        settings = read_result(result).get("config")
        if settings is not None or not os.path.isfile(checkpoint):
            return settings, result
        try:
            return load_checkpoint(checkpoint).get("config"), checkpoint
        except RunFileError:      # damaged: finished, so nothing trains from it
            return None, None
    if os.path.isfile(checkpoint):
        return load_checkpoint(checkpoint).get("config"), checkpoint
    return None, None


def _as_trained(settings):
    """``settings`` as :func:`_check_resume` compares them: the dropout as the model trains with it
    (a config.json from before the record named it says None for the WRN's 0.3, 0.3 for a ResNet
    on CIFAR-100, which has none), and ``alpha`` None where a run saved before ``--alpha`` existed
    has none (its layers trained at scale 1)."""
    from .models import MODELS, model_dropout
    settings = dict(settings, alpha=settings.get("alpha"))
    if settings.get("model") in MODELS:
        settings = dict(settings, dropout=model_dropout(settings["model"], settings.get("dropout")))
    return settings


def _check_resume(out_dir, cfg):
    """Check a run's saved files before a resume; return whether every schedule has finished.

    Each schedule's result.json or checkpoint holds the settings it trained with (finished ones
    too: a compare job's rows share theirs): a config.json edited since in anything but
    :data:`RESUME_BOOKKEEPING` is refused, naming the keys. Damaged files raise RunFileError.
    """
    schedules = SCHEDULE_DIRS if cfg.get("schedule") == "compare" else (cfg.get("schedule"),)
    if not all(s in SCHEDULE_DIRS for s in schedules):
        raise ValueError(f"config.json names an unknown schedule {cfg.get('schedule')!r}")
    finished = all(os.path.isfile(os.path.join(out_dir, s, "result.json")) for s in schedules)
    current = _as_trained(cfg)
    for schedule in schedules:
        original, path = _trained_settings(out_dir, schedule)
        if not isinstance(original, dict):
            continue
        original = _as_trained(original)
        changed = sorted(k for k in set(original) | set(current) if k not in RESUME_BOOKKEEPING
                         and original.get(k, "<absent>") != current.get(k, "<absent>"))
        if changed:
            raise ValueError(f"config.json differs from the settings the {schedule} run trained with ({path}) in "
                             f"{', '.join(changed)}; only {', '.join(_flag(k) for k in ('device', *RESUME_OVERRIDES))} "
                             f"may change on a resume (as flags). Restore config.json, or start a new run with --out")
    return finished


def load_data(cfg, log=print):
    """The data object for ``cfg`` (TextData or VisionData) on ``cfg['device']``."""
    from .augment import VisionData
    from .data import DATASETS, download, load_vision
    if cfg["data"] == "stdlib":
        from .corpus import TextData, load_stdlib_corpus
        train, val, _ = load_stdlib_corpus()
        return TextData(train, val, cfg["context"], cfg["batch_size"], steps=cfg.get("steps_per_epoch"),
                        device=cfg["device"], seed=cfg["seed"])
    root = cfg.get("data_dir") or "data"
    if cfg.get("download"):
        log(f"downloading {cfg['data']} into {root} ...")
        download(cfg["data"], root)
    cache = cfg.get("cache_dir") or os.path.join(os.path.expanduser("~"), ".cache", "dynrank")
    started = time.perf_counter()
    train_x, train_y, test_x, test_y, classes = load_vision(cfg["data"], root, cache_dir=cache)
    log(f"loaded {cfg['data']} from {root} in {time.perf_counter() - started:.1f}s")
    spec = DATASETS[cfg["data"]]
    recipe = "tiny-imagenet" if cfg["data"] == "tiny-imagenet" else "cifar"
    return VisionData(train_x, train_y, test_x, test_y, spec["mean"], spec["std"], cfg["batch_size"], recipe,
                      device=cfg["device"], channels_last=cfg["channels_last"], seed=cfg["seed"], classes=classes,
                      num_classes=spec["classes"])


def _load_data(cfg, log):
    """:func:`load_data`, with the data line logged; a data set that cannot be read is a DataError."""
    from .data import DataError
    try:
        data = load_data(cfg, log)
    except ValueError as err:   # e.g. a batch larger than the data set
        raise DataError(str(err)) from None
    except OSError as err:      # e.g. a file it may not read
        raise DataError(f"could not load {cfg['data']}: {err}") from None
    log(f"data: {data.describe()}")
    return data


def _print_settings(cfg, log):
    keys = ("model", "data", "schedule", "rank_ratio", "decomposition", "epochs", "milestones", "inflate_epoch",
            "deflate_epoch", "alpha", "optimizer", "lr", "batch_size", "weight_decay", "label_smoothing", "seed",
            "device", "amp", "threads", "compile", "compile_mode", "cuda_graphs")
    log("settings: " + ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg))


def run_job(cfg, out_dir, resume=False, log=print, data=None):
    """Run the schedules of ``cfg`` into ``out_dir`` on ``data`` (loaded here when None); print and
    return the compare table."""
    from ..monitor import RankMonitor
    from .loop import factorized_layers, run_training, write_json
    from .report import RunMonitor, compare_table, verdict, write_plots
    if data is None:
        data = _load_data(cfg, log)
    schedules = ("full", "lowrank", "dynamic") if cfg["schedule"] == "compare" else (cfg["schedule"],)
    results = []
    for schedule in schedules:
        log(f"\n== {schedule} ==")
        def factory(model, scheduler, name=schedule):
            return RunMonitor(model, scheduler, name, cfg["metrics_every"])
        result = run_training(cfg, schedule, data, os.path.join(out_dir, schedule), log=log, resume=resume,
                              monitor_factory=factory)
        if result.get("conversion"):
            with open(os.path.join(out_dir, schedule, "conversion.txt"), "w", encoding="utf-8") as handle:
                handle.write(result["conversion"] + "\n")
        results.append(result)
    # λ is summarized over the layers the converted runs factorize, for a full run alone as well.
    converted = next((r["converted_layers"] for r in results if r.get("converted_layers")), None)
    if converted is None:
        converted = factorized_layers(cfg, data.num_classes)
    table = compare_table(results, kind=data.kind, converted_layers=converted)
    with open(os.path.join(out_dir, "compare.txt"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    write_json(os.path.join(out_dir, "compare.json"), [{k: v for k, v in r.items()
                                                        if k not in ("monitor_records", "config")}
                                                       for r in results])
    monitors = [RankMonitor.load(os.path.join(out_dir, s, "monitor")) for s in schedules]
    paths, note = write_plots(monitors, os.path.join(out_dir, "plots"), kind=data.kind)
    log("\n" + table)
    line = verdict(results, data.kind)
    if line:
        log(line)
    if note:
        log(note)
    return table, results, paths


def main(argv=None):
    """Entry point of ``dynrank-train`` and ``python -m dynrank.train``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    log = lambda *a: print(*a, flush=True)
    from .data import DataError
    from .loop import Interrupted, RunFileError, read_json, write_json
    started = time.perf_counter()
    out_dir = claimed = None
    try:
        if args.resume:
            config_path = os.path.join(args.resume, "config.json")
            if not os.path.isfile(config_path):
                parser.error(f"--resume {args.resume}: no config.json there (not a dynrank-train output folder)")
            try:
                cfg = read_json(config_path)
                _check_saved(cfg, config_path)
                finished = _check_resume(args.resume, cfg)
            except (RunFileError, ValueError) as err:
                parser.error(f"--resume {args.resume}: {err}")
            # The record names the dropout the model trains with (a run saved before it did may not).
            cfg = _as_trained(cfg)
            saved = dict(cfg)
            if args.device:
                # The saved thread count and --amp stay (they decide the losses) unless given; --amp
                # follows a change of device type, see _resume_amp.
                cfg["device"] = args.device
            for key in RESUME_OVERRIDES:
                if getattr(args, key) is not None:
                    cfg[key] = getattr(args, key)
            if args.compile_mode is not None and args.compile is not False:
                cfg["compile"] = True
            if args.download:          # data that moved (--data-dir) may be fetched again
                cfg["download"] = True
            _absolute_folders(cfg)
            try:
                _check_values(cfg)
                if not finished:
                    _check_factorizable(cfg, resume=True)
            except ValueError as err:
                parser.error(f"--resume {args.resume}: {err}")
            given = _explicit(args)
            kept = sorted(k for k in given if k not in ("resume", "device", "download", *RESUME_OVERRIDES))
            note = _ignoring("--resume uses the saved settings", given, kept)
            if note:
                log(note)
            out_dir = args.resume
        else:
            notes = []
            try:
                cfg = config_from_args(args, notes)
            except ValueError as err:
                parser.error(str(err))
            for note in notes:
                log(note)
            if args.out:
                blocker = _file_in_the_way(args.out)
                if blocker:
                    why = ("is a file" if blocker == os.path.abspath(args.out)
                           else f"cannot be made: {blocker} is a file")
                    parser.error(f"--out {args.out} {why}, not a directory; choose another --out")
                existing = _holds_run(args.out)
                if existing:
                    parser.error(f"--out {args.out} already holds a run ({existing}); continue it with "
                                 f"--resume {args.out}, or choose another --out")
            elif _file_in_the_way("runs"):
                parser.error(f"the default output folder runs/<timestamp> cannot be made: "
                             f"{os.path.abspath('runs')} is a file, not a directory; give --out")
            finished = False
        try:
            # A resume without --device goes on where the run was saved, and errors say so.
            cfg = _resolve_device(cfg, saved_in=args.resume if args.resume and not args.device else None)
        except ValueError as err:
            parser.error(str(err))
        if args.resume:
            note = _resume_amp(saved, cfg, amp_given=args.amp is not None)
            if note:
                log(note)
        if not cfg["device"].startswith("cuda"):
            from .loop import CPU_CHANNELS_LAST_MIN_CHANNELS, cpu_bf16_native
            if cfg["amp"] and cpu_bf16_native() is False:
                log("note: --amp on a CPU without native bf16 (AVX-512 BF16 or AMX): oneDNN emulates it, "
                    "and steps run several times slower than fp32 (--no-amp)")
            if cfg["model"] != "gpt" and not cfg["channels_last"]:
                log(f"note: training NCHW, not channels-last: the net has a strided 1x1 conv narrower than "
                    f"{CPU_CHANNELS_LAST_MIN_CHANNELS} channels, whose channels-last CPU backward torch gets wrong")
        _print_settings(cfg, log)
        # Loaded before --out is claimed: a data set that cannot be read leaves no folder that a retry
        # with the right --data-dir would find taken.
        data = _load_data(cfg, log)
        if args.resume:
            _note_resume(saved, cfg)
        elif args.out:
            out_dir = args.out
            try:
                taken = not _claim_out_dir(out_dir)
            except OSError as err:      # what the checks above cannot see: no permission, a read-only disk
                parser.error(f"--out {out_dir} cannot be made ({err}); choose another --out")
            if taken:
                parser.error(f"--out {out_dir} was just taken by another run (it holds a config.json now); "
                             f"choose another --out")
            claimed = os.path.join(out_dir, "config.json")
        else:
            try:
                out_dir = _new_run_dir()
            except OSError as err:
                parser.error(f"the default output folder runs/<timestamp> cannot be made ({err}); give --out")
        if not finished:     # a finished run's settings stay as they were
            try:
                write_json(os.path.join(out_dir, "config.json"), cfg)
            except BaseException:
                if not args.resume:     # nothing of this run is saved: no folder to continue
                    if claimed:         # release --out: the empty claim would read as a damaged run to a retry
                        os.remove(claimed)
                    else:               # the runs/<timestamp> folder made for it, still empty
                        with contextlib.suppress(OSError):
                            os.rmdir(out_dir)
                    out_dir = None
                raise
        log(f"dynrank-train: output in {out_dir}")
        _, _, plots = run_job(cfg, out_dir, resume=bool(args.resume), log=log, data=data)
    except (DataError, RunFileError) as err:
        print(f"dynrank-train: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"\ndynrank-train: stopped; checkpoint written to {err.checkpoint}\n"
              f"continue with: dynrank-train --resume {out_dir}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        # A second Ctrl-C (or one outside the training loop): the last epoch's checkpoint stands.
        print("\ndynrank-train: aborted" + (f"; dynrank-train --resume {out_dir} continues from the last "
                                             f"saved epoch" if out_dir else ""), file=sys.stderr)
        return 130
    log(f"\nfinished in {time.perf_counter() - started:.0f}s; outputs in {out_dir}"
        + (f" (plots: {os.path.join(out_dir, 'plots')})" if plots else ""))
    return 0
