"""``dynrank-train``'s settings: the paper's presets and the main job, the command-line parser, and
their resolution into one configuration dict with every value checked (:func:`config_from_args`)."""

import argparse
import math
import os

__all__ = ["build_parser", "config_from_args", "PRESETS", "MAIN_JOB"]

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
    g.add_argument("--download", action="store_true",
                   help="fetch the official archive into --data-dir, unless the data set is there in another "
                        "form (extracted, an image tree); an archive there is fetched again if its MD5 is not "
                        "the official one")
    g.add_argument("--cache-dir", help="keep decoded image trees here (default: ~/.cache/dynrank)")
    g = p.add_argument_group("schedule")
    g.add_argument("--schedule", choices=("full", "lowrank", "dynamic", "compare"),
                   help="compare: train full, lowrank and dynamic and print a table (default: compare for "
                        "the GPT on stdlib, the main job's settings; dynamic for the vision models)")
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
    g.add_argument("--steps-per-epoch", type=int, help="batches per epoch, ≥ 1 (default: 120, the main job's)")
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
    ``--no-compile``) are named in ``notes`` (a list, when given).  A single-form run's I and D are
    the ones it has without ``--inflate-epoch``, ``--deflate-epoch`` and ``--full-rank-fraction``:
    given, they are not used, and the two epochs are not range-checked (a ``--full-rank-fraction``
    outside (0, 1] is still refused, as are the three flags given together).

    Raises:
        ValueError: settings that do not fit together (:func:`_check_settings`), a value out of range,
            or a model size too large to build or that leaves a lowrank or dynamic run no layer to
            factorize (message says which).
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
    same_schedule = epochs == reference["epochs"] and cfg["milestones"] == reference["milestones"]
    # A single-form run does not switch: the switch flags given are noted (_unused_notes) and left out,
    # so it records, and is checked with, the I and D it has without them.
    switch = {key: given[key] for key in ("inflate_epoch", "deflate_epoch", "full_rank_fraction")
              if key in given and cfg["schedule"] not in ("full", "lowrank")}
    if "inflate_epoch" in switch and "deflate_epoch" in switch:
        inflate, deflate = switch["inflate_epoch"], switch["deflate_epoch"]
    elif same_schedule and "full_rank_fraction" not in switch:
        inflate, deflate = reference["inflate_epoch"], reference["deflate_epoch"]
    elif not cfg["milestones"] and cfg["schedule"] in ("full", "lowrank"):
        inflate, deflate = 0, epochs        # a single-form run: no switch to place
    elif not cfg["milestones"]:
        raise ValueError("without LR milestones there is no decay to place the full-rank phase around; "
                         "give --inflate-epoch and --deflate-epoch")
    else:
        _check_milestones(cfg)      # before schedule_from_lr, whose own errors would name no flag
        inflate, deflate = schedule_from_lr(epochs, milestones=cfg["milestones"],
                                            full_rank_fraction=switch.get("full_rank_fraction", 0.5))
    cfg["inflate_epoch"] = switch.get("inflate_epoch", inflate)
    cfg["deflate_epoch"] = switch.get("deflate_epoch", deflate)
    derived = [f"{name}={cfg[key]}" for name, key in (("I", "inflate_epoch"), ("D", "deflate_epoch"))
               if key not in switch]
    how = ""
    if derived:
        source = ("the data set's defaults" if same_schedule and "full_rank_fraction" not in switch
                  else f"the paper's rule from epochs={epochs}, milestones={cfg['milestones']}")
        how = (f" ({' and '.join(derived)} derived by {source}; give "
               + " and ".join(f"--{k.replace('_', '-')}" for k in ("inflate_epoch", "deflate_epoch")
                              if k not in switch) + ")")
    _check_settings(cfg, how=how)
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


def _check_values(cfg, saved_in=None):
    """Each numeric setting in its range, as a ``--flag must be …, got …`` ValueError.

    ``saved_in``: the config.json ``cfg`` was read from (a resume), whose name and keys the errors
    then give instead of flags: ``DIR/config.json's metrics_every must be ≥ 1, got 0``.
    """
    name = (lambda key: f"{saved_in}'s {key}") if saved_in else _flag

    def need(key, ok, what):
        value = cfg.get(key)
        if value is not None and not ok(value):
            raise ValueError(f"{name(key)} must be {what}, got {value}")
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


def _check_milestones(cfg, saved_in=None):
    """``cfg``'s LR milestones in (0, epochs) and increasing, as a ValueError (see :func:`_check_settings`)."""
    epochs, milestones = cfg["epochs"], cfg["milestones"]
    name = f"{saved_in}'s milestones" if saved_in else "--milestones"
    if any(not 0 < m < epochs for m in milestones):
        raise ValueError(f"{name} must lie in (0, epochs={epochs}), got {milestones}")
    if any(a >= b for a, b in zip(milestones, milestones[1:])):
        raise ValueError(f"{name} must be increasing, each epoch once (a repeated one would cut the LR "
                         f"twice), got {','.join(map(str, milestones))}")


def _check_settings(cfg, saved_in=None, how=""):
    """Refuse settings of ``cfg`` that do not fit together (each is in its range: :func:`_check_values`), as
    a ValueError: a model and data set that do not go together, a GPT whose ``dim`` its ``heads`` do not
    divide, LR milestones outside (0, epochs) or not increasing, switch epochs outside 0 ≤ I < D ≤ E
    (``deflate_epoch`` None: E).

    A new run's settings (:func:`config_from_args`) and a resumed run's config.json are checked alike:
    ``saved_in``, the config.json ``cfg`` was read from, makes the errors name it and its keys rather
    than flags.  ``how`` ends the I/D error (how a new run derived them).
    """
    name = (lambda key: key) if saved_in else _flag
    whose, its = (f"{saved_in}'s ", "its ") if saved_in else ("", "")
    model, data, epochs = cfg["model"], cfg["data"], cfg["epochs"]
    if (model == "gpt") != (data == "stdlib"):
        raise ValueError(f"{whose}{name('model')} {model} cannot train on {its}{name('data')} {data}: the GPT "
                         f"reads the stdlib text, the vision models read cifar10, cifar100 or tiny-imagenet")
    if model == "gpt" and cfg["dim"] % cfg["heads"]:
        raise ValueError(f"{whose}{name('dim')} must be divisible by {its}{name('heads')}, got dim={cfg['dim']}, "
                         f"heads={cfg['heads']}")
    _check_milestones(cfg, saved_in)
    inflate, deflate = cfg["inflate_epoch"], cfg["deflate_epoch"]
    if not 0 <= inflate < (epochs if deflate is None else deflate) <= epochs:
        lead = f"{whose}inflate_epoch and deflate_epoch " if saved_in else ""
        raise ValueError(f"{lead}need 0 ≤ inflate epoch < deflate epoch ≤ epochs, got I={inflate}, "
                         f"D={'null' if deflate is None else deflate}, epochs={epochs}{how}")


def _num_classes(cfg):
    """The classifier size of ``cfg``'s model: the data set's classes, 256 byte values for the stdlib text."""
    from .data import DATASETS
    return 256 if cfg["data"] == "stdlib" else DATASETS[cfg["data"]]["classes"]


def _check_factorizable(cfg, resume=False):
    """Refuse a model size too large to build, or one that leaves ``cfg``'s lowrank or dynamic runs no
    layer to factorize, as a ValueError naming the size (and ``convert_model``'s min_features).

    The model is built on the meta device (no memory, no time).  Torch refuses there a weight of
    2**63 bytes or more, or a side past int64 (its RuntimeError, TypeError or OverflowError), which
    is what is caught; a fixed bound on ``--width``, ``--dim`` or ``--context`` could not say so for
    every model, as their widest weights differ.  ``convert_model`` would find nothing to factorize
    only when the first converted run starts: in a compare job, after the full run has trained.
    ``resume``: the size is a run's saved one, which only a new run changes.
    """
    import torch
    from .loop import MIN_FEATURES, _build, factorized_layers
    classes = _num_classes(cfg)
    size = "dim" if cfg["model"] == "gpt" else "width"
    value = cfg.get(size, GENERIC[size])
    how = "start a new run (--out) with" if resume else "use"
    try:
        with torch.device("meta"):
            _build(cfg, classes)
    except (RuntimeError, TypeError, OverflowError):
        if cfg["model"] == "gpt":    # the position embedding is context × dim
            flags, got = ("--dim", "--context"), f"dim={cfg['dim']}, context={cfg['context']}"
        else:
            flags, got = ("--width",), f"{value:g}"
        raise ValueError(f"{' and '.join(flags)} must leave every weight of {cfg['model']} small enough for torch "
                         f"to build (under 2**63 bytes), got {got}; {how} a smaller {' or '.join(flags)}") from None
    if cfg["schedule"] == "full" or factorized_layers(cfg, classes):
        return
    raise ValueError(f"{_flag(size)} {value:g} leaves no layer of {cfg['model']} whose weight "
                     f"has both sides ≥ convert_model's min_features={MIN_FEATURES}, so --schedule "
                     f"{cfg['schedule']} has nothing to factorize; {how} --schedule full or a larger {_flag(size)}")
