"""``dynrank-train``: train full, low-rank and dynamic-rank models from the command line.

With no arguments it runs the main job: a small byte-level transformer LM on
Python's own standard-library sources, trained full rank, fixed low rank and
dynamic rank (low rank → full → adapter), then a side-by-side table and the
RankMonitor files and plots under ``runs/<timestamp>``.  Flags select the
paper's experiments (``--preset cifar10-resnet20`` …) or any mix of model,
data and schedule; see ``dynrank-train --help``.
"""

import contextlib
import os
import sys
import time

from .config import (MAIN_JOB, PRESETS, RESUME_OVERRIDES, _absolute_folders, _check_factorizable, _check_settings,
                     _check_values, _explicit, _ignoring, build_parser, config_from_args)
from .runs import (_as_trained, _check_resume, _check_saved, _claim_out_dir, _file_in_the_way, _holds_run,
                   _new_run_dir, _note_resume)

__all__ = ["main", "build_parser", "config_from_args", "PRESETS", "MAIN_JOB"]


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


def _found_elsewhere(name, root):
    """Where in ``root`` :func:`~.data.load_vision` finds data set ``name`` in another form than its
    official archive (extracted, an image-folder tree named after it), or None.

    ``--download`` fetches only where this is None: a data set found so is read as it is (a resume with
    its data present never goes online), and the official archive is left to :func:`~.data.download`,
    which keeps it when its MD5 is the official one and fetches it again when not.  An image-folder tree
    at ``root`` itself counts as not found: it may be another data set's, which the official archive
    fetched beside it comes before.
    """
    from .data import _sources
    if not os.path.isdir(root):
        return None
    path, _, settled = next(_sources(root, name), (None, None, False))
    return path if settled else None


def load_data(cfg, log=print):
    """The data object for ``cfg`` (TextData or VisionData) on ``cfg['device']``.

    With ``cfg["download"]`` the official archive is fetched into the data folder unless the data
    set is found there in another form (:func:`_found_elsewhere`).
    """
    from .augment import VisionData
    from .data import DATASETS, download, load_vision
    if cfg["data"] == "stdlib":
        from .corpus import TextData, load_stdlib_corpus
        train, val, _ = load_stdlib_corpus()
        return TextData(train, val, cfg["context"], cfg["batch_size"], steps=cfg.get("steps_per_epoch"),
                        device=cfg["device"], seed=cfg["seed"])
    root = cfg.get("data_dir") or "data"
    if cfg.get("download"):
        found = _found_elsewhere(cfg["data"], root)
        if found:
            log(f"--download: {cfg['data']} is in {found} already; nothing to fetch")
        else:
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


def _plots_skipped(out_dir, schedules, err, failed):
    """The note that leaves the plots out: ``plots skipped: <files> cannot be <failed> (<err>)``, with
    ``failed`` "read" or "plotted"; one schedule's RankMonitor file is named with its run, several as a list."""
    from .data import _reason
    stems = [os.path.join(out_dir, s, "monitor") for s in schedules]
    files = (f"the {schedules[0]} run's RankMonitor file {stems[0]}.json (or {stems[0]}.epochs.csv)"
             if len(stems) == 1 else
             f"the RankMonitor files {', '.join(s + '.json' for s in stems)} (or their .epochs.csv)")
    return f"plots skipped: {files} cannot be {failed} ({_reason(err)})"


def _saved_monitors(out_dir, schedules):
    """(RankMonitors the runs saved, None), or (None, a note naming the file) where one is missing or
    damaged: they are written in place; the plots read them, and the table's λ where a result has no
    ``monitor_records`` (a result.json slimmed of them).

    Each is named after its schedule, which names its plot (``lambda_<schedule>.png``) and its curves:
    one read from its CSV files (its JSON gone) would be named after the files, ``monitor`` for all.
    """
    from ..monitor import RankMonitor
    monitors = []
    for schedule in schedules:
        try:
            monitor = RankMonitor.load(os.path.join(out_dir, schedule, "monitor"))
        except (OSError, ValueError) as err:
            return None, _plots_skipped(out_dir, (schedule,), err, "read")
        monitor.name = schedule
        monitors.append(monitor)
    return monitors, None


def run_job(cfg, out_dir, resume=False, log=print, data=None):
    """Run the schedules of ``cfg`` into ``out_dir`` on ``data``; print and return the compare table.

    ``data`` is None where every schedule has finished (a resume that only writes the table and plots
    again needs no data set).  The table is printed before the plots are drawn: RankMonitor files that
    are missing or damaged leave the plots out, with a note naming them.  A result without
    ``monitor_records`` takes them from its run's RankMonitor files, so its λ still shows.
    """
    from .config import _num_classes
    from .loop import factorized_layers, run_training, write_json
    from .report import RunMonitor, compare_table, verdict, write_plots
    schedules = ("full", "lowrank", "dynamic") if cfg["schedule"] == "compare" else (cfg["schedule"],)
    kind = "text" if cfg["data"] == "stdlib" else "vision"
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
        converted = factorized_layers(cfg, _num_classes(cfg))
    monitors, note = _saved_monitors(out_dir, schedules)
    for result, monitor in zip(results, monitors or ()):
        result.setdefault("monitor_records", monitor.records)
    table = compare_table(results, kind=kind, converted_layers=converted)
    with open(os.path.join(out_dir, "compare.txt"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    write_json(os.path.join(out_dir, "compare.json"), [{k: v for k, v in r.items()
                                                        if k not in ("monitor_records", "config")}
                                                       for r in results])
    log("\n" + table)
    line = verdict(results, kind)
    if line:
        log(line)
    paths = []
    if monitors:
        try:
            paths, note = write_plots(monitors, os.path.join(out_dir, "plots"), kind=kind)
        except (KeyError, TypeError, ValueError) as err:    # files that load but hold damaged entries
            note = _plots_skipped(out_dir, schedules, err, "plotted")
    if note:
        log(note)
    return table, results, paths


def main(argv=None):
    """Entry point of ``dynrank-train`` and ``python -m dynrank.train``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    log = lambda *a: print(*a, flush=True)
    from .data import DataError
    from .loop import Diverged, Interrupted, RunFileError, read_json, write_json
    # An empty path (--resume "$RUN" with RUN unset) is a mistake, not the flag left out.
    if args.resume == "":
        parser.error("--resume needs a run folder, got ''")
    if args.out == "":
        parser.error("--out needs a folder, got ''")
    started = time.perf_counter()
    out_dir = claimed = None
    try:
        if args.resume is not None:
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
            if args.device is not None:
                # The saved thread count and --amp stay (they decide the losses) unless given; --amp
                # follows a change of device type, see _resume_amp.
                cfg["device"] = args.device
            overrides = {key: getattr(args, key) for key in RESUME_OVERRIDES if getattr(args, key) is not None}
            cfg.update(overrides)
            if args.compile_mode is not None and args.compile is not False:
                cfg["compile"] = True
            if args.download:          # data that moved (--data-dir) may be fetched again
                cfg["download"] = True
            _absolute_folders(cfg)
            try:
                _check_values(overrides)                        # the flags given, named as flags
                _check_values(cfg, saved_in=config_path)        # the rest is config.json's
                # Before the first checkpoint there is nothing to compare config.json with (_check_resume):
                # its settings must fit together as a new run's do.
                _check_settings(cfg, saved_in=config_path)
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
            if args.out is not None:
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
            resumed_as_saved = args.resume is not None and args.device is None
            cfg = _resolve_device(cfg, saved_in=args.resume if resumed_as_saved else None)
        except ValueError as err:
            parser.error(str(err))
        if args.resume is not None:
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
        # with the right --data-dir would find taken.  A finished run only writes its table and plots
        # again, which need no data set.
        data = None if finished else _load_data(cfg, log)
        if args.resume is not None:
            _note_resume(saved, cfg)
        elif args.out is not None:
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
                if args.resume is None:     # nothing of this run is saved: no folder to continue
                    if claimed:         # release --out: the empty claim would read as a damaged run to a retry
                        os.remove(claimed)
                    else:               # the runs/<timestamp> folder made for it, still empty
                        with contextlib.suppress(OSError):
                            os.rmdir(out_dir)
                    out_dir = None
                raise
        log(f"dynrank-train: output in {out_dir}")
        _, _, plots = run_job(cfg, out_dir, resume=args.resume is not None, log=log, data=data)
    except (DataError, RunFileError, Diverged) as err:
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
