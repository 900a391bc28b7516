"""``dynrank-train``'s run folders: where a run's outputs go, and what a resume checks of the
settings saved there (config.json against each schedule's checkpoint or result)."""

import json
import os
import time

from .config import RESUME_OVERRIDES, _flag, build_parser

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
    :data:`RESUME_BOOKKEEPING` is refused, naming the keys. Every schedule folder with saved
    settings is checked, not only those the edited config names: a ``full`` run's config edited
    to ``lowrank`` would start another run beside it. Damaged files raise RunFileError.
    """
    schedules = SCHEDULE_DIRS if cfg.get("schedule") == "compare" else (cfg.get("schedule"),)
    if not all(s in SCHEDULE_DIRS for s in schedules):
        raise ValueError(f"config.json names an unknown schedule {cfg.get('schedule')!r}")
    finished = all(os.path.isfile(os.path.join(out_dir, s, "result.json")) for s in schedules)
    current = _as_trained(cfg)
    for schedule in SCHEDULE_DIRS:
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
