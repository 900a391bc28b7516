"""One training run: build, convert, train, evaluate, checkpoint, resume.

:func:`run_training` trains one model under one schedule:

- ``full``: the dense model;
- ``lowrank``: every eligible layer factorized (``convert_model``) for the whole run;
- ``dynamic``: factorized, inflated to full rank at epoch I and deflated to
  adapters at D by :class:`dynrank.DynamicRankScheduler`.

GPU habits: the data set lives on the device, losses and correct counts are
summed on the device and read once per epoch (plus a few times per second for
the progress line on a terminal), channels-last and bf16 autocast where they
help.  A checkpoint is written after every epoch; Ctrl-C stops after the
current batch and writes one at that exact batch, from which ``--resume``
continues to the same final state as an uninterrupted run.
"""

import json
import math
import os
import signal
import time

import torch
from torch.nn import functional as F

from .._checks import NonFiniteError
from .._records import write_csv
from ..checkpoint import load_training_state, training_state
from ..convert import convert_model
from ..scheduler import DynamicRankScheduler
from .models import EXCLUDE, build_model, count_parameters
from .progress import ProgressLine
from .steps import TrainStep, upcast_logits

__all__ = ["run_training", "Interrupted", "RunFileError", "Diverged", "SCHEDULES", "lr_at", "build_optimizer",
           "write_atomic", "write_json", "read_json", "load_checkpoint", "factorized_layers", "MIN_FEATURES"]

SCHEDULES = ("full", "lowrank", "dynamic")
CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"


class Interrupted(Exception):
    """Training stopped on request (Ctrl-C); ``checkpoint`` is where it can resume from."""

    def __init__(self, checkpoint):
        super().__init__(f"interrupted; resumable checkpoint at {checkpoint}")
        self.checkpoint = checkpoint


class RunFileError(Exception):
    """A run's saved file (config.json, result.json, checkpoint.pt) cannot be read; the message names it."""


class Diverged(Exception):
    """A dynamic run's weights went NaN/inf before a form change, which the scheduler refuses to make; the
    message names the run, the layer and the epoch.  The last checkpoint is left as it was (a resume
    from it stops at the same place)."""


def _new_temp_file(folder, name):
    """Create an empty, uniquely named temp file for ``name`` in ``folder``; returns its path.

    It is created as ``open(path, "w")`` creates a file, mode 0o666 less the umask (``mkstemp``'s
    0o600 would survive the rename: a run's files readable by their owner only, unlike ``model.pt``).
    """
    while True:
        tmp = os.path.join(folder, f".{name}.{os.urandom(6).hex()}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def write_atomic(path, write):
    """Call ``write(tmp_path)``, then rename the temp file onto ``path``: a crash leaves the old file or the new.

    The temp file is unique (two writers never share it), flushed to disk before the rename, and
    removed if writing fails.  The file gets the mode ``open(path, "w")`` gives a new file: 0o666
    less the umask.
    """
    folder, name = os.path.split(os.path.abspath(path))
    tmp = _new_temp_file(folder, name)
    try:
        write(tmp)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj):
    """``obj`` as indented JSON at ``path``, written atomically (temp file + rename)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=1)
    write_atomic(path, write)


def read_json(path, kind=dict):
    """The JSON object in ``path``; :class:`RunFileError` naming the file if it is damaged."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (ValueError, UnicodeDecodeError) as err:
        raise RunFileError(f"{path} is damaged (not valid JSON: {str(err).splitlines()[0]})") from None
    if not isinstance(value, kind):
        raise RunFileError(f"{path} is damaged (expected a JSON {kind.__name__}, got {type(value).__name__})")
    return value


def read_result(path):
    """A finished run's result.json (:func:`run_training`'s result); :class:`RunFileError` naming the file
    and the entry where it is damaged or not of that shape (the comparison table and a resume's checks
    read these entries)."""
    result = read_json(path)
    shape = (("schedule", str, "a string"), ("history", list, "a list of epoch records"),
             ("params", dict, "an object"))
    for key, kind, what in shape:
        if not isinstance(result.get(key), kind):
            got = "missing" if key not in result else f"got {type(result[key]).__name__}"
            raise RunFileError(f"{path} is damaged ({key!r} must be {what}, {got})")
    if not result["history"] or not all(isinstance(record, dict) for record in result["history"]):
        raise RunFileError(f"{path} is damaged ('history' must be a non-empty list of epoch records)")
    if not isinstance(result.get("config", {}), dict):
        raise RunFileError(f"{path} is damaged ('config' must be an object, got "
                           f"{type(result['config']).__name__})")
    return result


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict in ``path``; :class:`RunFileError` naming the file if it is damaged."""
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:   # truncated, empty or garbage files fail in many ways inside torch/pickle
        raise RunFileError(f"{path} is damaged and cannot be resumed from ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None
    if not isinstance(checkpoint, dict) or "epoch" not in checkpoint:
        raise RunFileError(f"{path} is damaged and cannot be resumed from (not a dynrank-train checkpoint)")
    return checkpoint


class _StopFlag:
    """SIGINT sets a flag read between batches; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.stop = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def lr_at(cfg, epoch, step=0, steps_per_epoch=1):
    """Learning rate at ``step`` of ``epoch``: step decay ×``lr_decay`` at milestones, linear warm-up."""
    lr = cfg["lr"] * cfg["lr_decay"] ** sum(epoch >= m for m in cfg["milestones"])
    warmup = cfg.get("warmup_steps", 0)
    done = epoch * steps_per_epoch + step
    if warmup and done < warmup:
        lr *= (done + 1) / warmup
    return lr


def build_optimizer(model, cfg):
    """SGD with momentum 0.9 (vision, the paper's) or AdamW, betas (0.9, 0.95) (GPT); no decay on 1-D params.

    Factors and dense weights are ≥ 2-D and share the decayed group, so a
    form change keeps a layer's parameters in the group they came from.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, 0.95))
    return torch.optim.SGD(groups, lr=cfg["lr"], momentum=0.9)


def _build(cfg, num_classes):
    return build_model(cfg["model"], num_classes=num_classes, width=cfg.get("width", 1.0),
                       dropout=cfg.get("dropout"), context=cfg.get("context", 128), dim=cfg.get("dim", 128),
                       depth=cfg.get("depth", 2), heads=cfg.get("heads", 4))


# convert_model's smallest matrix side to factorize, as the lowrank and dynamic runs apply it.
MIN_FEATURES = 8


def _factorize(model, cfg, init="dense"):
    """``convert_model`` as the lowrank and dynamic runs of ``cfg`` apply it; returns its summary.  A run
    saved before ``alpha`` was a setting has none: its layers trained at scale 1, as alpha None gives."""
    return convert_model(model, rank_ratio=cfg["rank_ratio"], decomposition=cfg["decomposition"],
                         form="lowrank", exclude=EXCLUDE[cfg["model"]], min_features=MIN_FEATURES, init=init,
                         alpha=cfg.get("alpha"))


def prepare_model(cfg, schedule, num_classes, device):
    """Seeded model, converted for lowrank/dynamic schedules; returns (model, conversion summary)."""
    torch.manual_seed(cfg["seed"])
    model = _build(cfg, num_classes)
    summary = _factorize(model, cfg) if schedule != "full" else None
    return _to_layout(model.to(device), cfg), summary


def factorized_layers(cfg, num_classes):
    """Names of the layers the lowrank and dynamic runs of ``cfg`` factorize, as in their results'
    ``converted_layers``; [] where ``convert_model`` finds nothing to convert.

    Found on the meta device with fresh factors: no memory, no fit.  Which layers are converted
    does not depend on the weights, so a full-rank run's λ can be summarized over the same layers.
    """
    with torch.device("meta"):
        model = _build(cfg, num_classes)
        try:
            return _factorize(model, cfg, init="fresh").converted
        except ValueError:      # nothing passes convert_model's rules: no layer is factorized
            return []


# torch's CPU backward (oneDNN's AVX2 1x1 kernel) of a channels-last 1×1 conv with stride 2 and
# fewer than 8 input channels (its channel block) is broken in torch 2.13.0 on an AVX2-only EPYC host:
# with 1 thread the process crashed (segmentation fault or abort), with 2 it returned wrong weight
# gradients without a word (max error 66 and 77 against float64 at 4 and 7 channels; NCHW 2e-5);
# 8, 9, 12, 16 and 20 channels were right. oneDNN tracks it as uxlfoundation/oneDNN#6035. A ResNet20
# at width 0.25 has a 4-channel projection shortcut, so conv nets that narrow train NCHW on a CPU.
CPU_CHANNELS_LAST_MIN_CHANNELS = 8


def trains_channels_last(model, device, width=1.0):
    """Whether a run of the built-in ``model`` at ``width`` on ``device`` trains its convs channels-last.

    The one place the layout is decided (``dynrank-train`` stores it in the run's settings as
    ``channels_last``; the paper summary names its device from it). Conv nets train channels-last
    on every device: on the 2-core CPU hosts a ResNet20 step is 1.25–1.76× faster than NCHW
    (``benchmarks/results/cpu-steps-*.md``), and on a GPU it always was the layout. On a CPU, a net
    with a strided 1×1 conv narrower than :data:`CPU_CHANNELS_LAST_MIN_CHANNELS` stays NCHW (found
    on the meta device: no memory, no time). The transformer has no convs.
    """
    if model == "gpt":
        return False
    if str(device).startswith("cuda"):
        return True
    from .models import narrowest_strided_pointwise
    with torch.device("meta"):
        net = build_model(model, width=width)
    narrowest = narrowest_strided_pointwise(net)
    return narrowest is None or narrowest >= CPU_CHANNELS_LAST_MIN_CHANNELS


def _channels_last(cfg):
    """Whether the run's convs train channels-last: its settings' ``channels_last``, which
    ``dynrank-train`` sets from :func:`trains_channels_last`."""
    return bool(cfg.get("channels_last"))


def _to_layout(model, cfg):
    """Put ``model``'s convs channels-last where the run trains so, in place (an optimizer keeps its
    references).  Called again after form changes: a cp or tkd-cpd layer inflated from lowrank form
    gets a contiguous W (its factors show no layout, see :class:`~dynrank.LowRankConv2d`)."""
    if _channels_last(cfg):
        model.to(memory_format=torch.channels_last)
    return model


@torch.no_grad()
def evaluate(model, data, autocast):
    """Mean loss and accuracy over ``data.val_batches()``; one host sync at the end.

    Raises:
        ValueError: ``data.val_batches()`` yielded no targets (there is no mean over nothing).
    """
    model.eval()
    device = data.device
    total, correct, count = (torch.zeros((), device=device, dtype=torch.float64) for _ in range(3))
    for inputs, targets in data.val_batches():
        with autocast():
            logits = model(inputs)
        logits = upcast_logits(logits.reshape(-1, logits.shape[-1]))
        targets = targets.reshape(-1)
        total += F.cross_entropy(logits, targets, reduction="sum")
        correct += (logits.argmax(-1) == targets).sum()
        count += targets.numel()
    count = count.item()
    if count == 0:
        raise ValueError(f"data.val_batches() must yield at least one target to evaluate, got none "
                         f"from {type(data).__name__}")
    return total.item() / count, correct.item() / count


def device_name(device, threads=None, channels_last=False, bf16=None):
    """What an epoch record names as the machine it ran on: the GPU's name, or the device type.

    A CPU epoch's time depends on how many threads torch used (``threads``, default
    ``torch.get_num_threads()``), for a conv net on its memory layout, and on whether it ran
    under bf16 autocast (``--amp``; 1.4–1.9× faster ResNet20 steps on a CPU with AVX-512 BF16), so
    the CPU's name carries all three — ``"cpu (2 threads)"``, ``"cpu (2 threads, channels-last)"``,
    ``"cpu (2 threads, channels-last, bf16)"`` — and epochs that differ in any are timed apart.
    On a GPU conv nets always train channels-last and bf16 autocast is the default, so only a GPU
    epoch run without it (``bf16=False``, ``--no-amp``) says so: ``"NVIDIA H100 80GB HBM3 (fp32)"``.
    ``bf16=None`` means the device's default.
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name} (fp32)" if bf16 is False else name
    if device.type == "cpu":
        threads = torch.get_num_threads() if threads is None else threads
        notes = [f"{threads} thread{'s' if threads != 1 else ''}"]
        if channels_last:
            notes.append("channels-last")
        if bf16:
            notes.append("bf16")
        return f"cpu ({', '.join(notes)})"
    return device.type


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device):
    # RNG states must be CPU byte tensors, wherever map_location put the checkpoint.
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _save(path, state):
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def cpu_bf16_native():
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 BF16 or AMX); None where torch won't say.

    Without it bf16 autocast on the CPU is emulated: a ResNet20 step ran about 9x slower than fp32
    (channels-last) on a 2-core AVX2 EPYC (``benchmarks/results/cpu-steps-2026-11-27-avx2.md``).
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def _autocast_factory(cfg, device):
    # bf16 keeps fp32's exponent range, so no loss scaling is needed.
    enabled = bool(cfg.get("amp"))

    def autocast(cache=True):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=cache)
    return autocast


def write_metrics(out_dir, history):
    """metrics.csv and metrics.json of per-epoch records."""
    if not history:
        return
    keys = list(dict.fromkeys(k for row in history for k in row))   # records from older runs may lack some
    # Quoted where needed: a CPU epoch's device, "cpu (1 thread, bf16)", holds a comma.
    write_csv(os.path.join(out_dir, "metrics.csv"), keys, history)
    write_json(os.path.join(out_dir, "metrics.json"), history)


def _epoch_line(cfg, record, kind):
    epochs = cfg["epochs"]
    text = f"epoch {record['epoch'] + 1:>{len(str(epochs))}}/{epochs} {record['form']:<7}"
    if kind == "text":
        text += (f" train loss {record['train_loss']:.4f} | val loss {record['val_loss']:.4f}"
                 f" ({record['val_bpb']:.3f} bpb, acc {100 * record['val_acc']:.1f}%)")
    else:
        text += (f" train loss {record['train_loss']:.4f} acc {100 * record['train_acc']:.2f}%"
                 f" | val loss {record['val_loss']:.4f} acc {100 * record['val_acc']:.2f}%")
    text += (f" | lr {record['lr']:.3g} | {record['train_time']:.1f}s"
             f" | {record['trainable_params']:,} params")
    return text


def _switch(scheduler, epoch, schedule, cfg, history):
    """``scheduler.step(epoch)``; its refusal of a layer due to switch that holds NaN/inf (the run
    diverged) raised as :class:`Diverged`, naming the run, the layer and the epoch."""
    try:
        return scheduler.step(epoch)
    except NonFiniteError as err:
        last = (f" by epoch {history[-1]['epoch'] + 1} (train loss {history[-1]['train_loss']:.4g})"
                if history else "")
        raise Diverged(f"the {schedule} run diverged{last}: layer {err.layer!r} has non-finite values in "
                       f"{err.tensor}; it cannot switch forms at epoch {epoch + 1}. Start a new run (--out) with "
                       f"a lower --lr than {cfg['lr']:g}; a --resume stops here again") from None


def run_training(cfg, schedule, data, out_dir, log=print, resume=False, monitor_factory=None,
                 progress=None):
    """Train one model under ``schedule`` and return its result dict.

    Args:
        cfg: configuration dict (see ``cli.config_from_args``): model, rank_ratio,
            decomposition, alpha (optional; None: scale 1), epochs, inflate_epoch,
            deflate_epoch, milestones, lr, lr_decay, optimizer, weight_decay,
            label_smoothing, seed, device, amp, compile, compile_mode, ...
        schedule: ``"full"``, ``"lowrank"`` or ``"dynamic"``.
        data: a :class:`.augment.VisionData` or :class:`.corpus.TextData`.
        out_dir: folder for checkpoint.pt, metrics.csv/json, result.json, model.pt.
        log: where summary lines go.
        resume: continue from ``out_dir/checkpoint.pt`` if present.
        monitor_factory: ``fn(model, scheduler) -> monitor`` (a
            :class:`.report.RunMonitor`), or None.
        progress: a :class:`.progress.ProgressLine` (default: one on stderr).

    Returns:
        dict with ``schedule``, ``history`` (per-epoch records), ``final``
        (last record), ``params`` (dense and low-rank counts), ``monitor``, and
        ``config``, the settings it trained with (also in its result.json, where
        ``--resume`` compares them with config.json).

    Raises:
        Interrupted: after Ctrl-C, once the checkpoint is written.
        Diverged: a dynamic run whose weights went NaN/inf before a form change, the last
            checkpoint (written after the epoch before) kept.
        ValueError: a schedule not in :data:`SCHEDULES`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    os.makedirs(out_dir, exist_ok=True)
    device = torch.device(cfg["device"])
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    result_path = os.path.join(out_dir, RESULT)
    if resume and os.path.isfile(result_path):
        result = read_result(result_path)
        log(f"[{schedule}] already finished: {result_path}")
        return result

    model, summary = prepare_model(cfg, schedule, data.num_classes, device)
    if summary is not None and not resume:
        alpha = "" if cfg.get("alpha") is None else f", alpha={cfg['alpha']:g}"
        log(f"[{schedule}] factorized {len(summary.converted)} of {len(summary.rows)} layers "
            f"(ρ={cfg['rank_ratio']:g}, {cfg['decomposition'] if cfg['model'] != 'gpt' else 'svd'}{alpha}): "
            f"{summary.params_before:,} → {summary.params_after:,} trainable parameters")
    dense_params = summary.params_before if summary is not None else count_parameters(model)
    optimizer = build_optimizer(model, cfg)
    scheduler = None
    if schedule == "dynamic":
        scheduler = DynamicRankScheduler(model, optimizer, cfg["inflate_epoch"], cfg["deflate_epoch"],
                                         deflate_init=cfg["deflate_init"], optimizer_state=cfg["optimizer_state"],
                                         epochs=cfg["epochs"])
    mode = cfg.get("compile_mode") or "default"
    forward = torch.compile(model, mode=None if mode == "default" else mode) if cfg.get("compile") else model
    autocast = _autocast_factory(cfg, device)
    train_step = TrainStep(model, optimizer, forward, autocast, cfg["label_smoothing"],
                           cuda_graphs=cfg.get("cuda_graphs", False), log=log)
    history, start_epoch, start_step, partial, resumed_monitor = [], 0, 0, None, None
    here = device_name(device, channels_last=_channels_last(cfg), bf16=bool(cfg.get("amp")))

    if resume and os.path.isfile(ckpt_path):
        checkpoint = load_checkpoint(ckpt_path, device)
        if scheduler is not None:
            load_training_state(checkpoint, model, optimizer, scheduler)
            _to_layout(model, cfg)
        else:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        history = checkpoint["history"]
        # Records from before epochs named their device ran where the checkpoint's run did.
        saved_on = checkpoint.get("device") or checkpoint.get("config", {}).get("device")
        for rec in history:
            rec.setdefault("device", saved_on)
        start_epoch, start_step, partial = checkpoint["epoch"], checkpoint["step"], checkpoint.get("partial")
        if partial is not None:
            partial.setdefault("device", saved_on)
        _set_rng_state(checkpoint["rng"], device)
        resumed_monitor = checkpoint.get("monitor")
        write_metrics(out_dir, history)   # the files on disk describe the state training goes on from
        if start_epoch < cfg["epochs"]:
            log(f"[{schedule}] resuming at epoch {start_epoch + 1}, batch {start_step + 1} from {ckpt_path}")
        else:       # stopped after the last epoch's checkpoint: only the results are left to write
            log(f"[{schedule}] all {cfg['epochs']} epochs trained ({ckpt_path}); writing the results")

    # Built after a resume's form changes, so it sees the restored forms as its starting point.
    monitor = monitor_factory(model, scheduler) if monitor_factory else None
    if monitor is not None and resumed_monitor is not None:
        monitor.load_state_dict(resumed_monitor)

    def checkpoint_state(epoch, step, partial_state):
        extra = dict(epoch=epoch, step=step, partial=partial_state, history=history, rng=_rng_state(device),
                     device=here,
                     config=cfg, schedule=schedule,
                     monitor=monitor.state_dict() if monitor is not None else None)
        if scheduler is not None:
            return training_state(model, optimizer, scheduler, **extra)
        return dict(model=model.state_dict(), optimizer=optimizer.state_dict(), **extra)

    progress = progress or ProgressLine(cfg["epochs"])
    steps = len(data)
    kind = getattr(data, "kind", "vision")
    with _StopFlag() as flag:
        for epoch in range(start_epoch, cfg["epochs"]):
            if scheduler is not None:
                changes = _switch(scheduler, epoch, schedule, cfg, history)
                if changes:
                    _to_layout(model, cfg)
                    forms = sorted({new for _, _, new in changes})
                    log(f"[{schedule}] epoch {epoch + 1}: {len(changes)} layers → {'/'.join(forms)} "
                        f"({count_parameters(model):,} trainable params)")
            form = _model_form(model)
            model.train()
            first = start_step if epoch == start_epoch else 0
            zeros = lambda: torch.zeros((), device=device, dtype=torch.float64)
            loss_sum, correct_sum, count_sum = zeros(), zeros(), zeros()
            elapsed, ran_on = 0.0, here
            if partial is not None and epoch == start_epoch:
                loss_sum += partial["loss"]
                correct_sum += partial["correct"]
                count_sum += partial["count"]
                elapsed = partial["time"]
                if partial.get("device") not in (None, here):   # an epoch begun elsewhere: its time is mixed
                    ran_on = f"{partial['device']}+{here}"
            progress.start_epoch(epoch, steps, first)
            replays = train_step.replays
            _sync(device)
            started = time.perf_counter()
            for step, (inputs, targets) in enumerate(data.train_batches(epoch, first), start=first):
                loss, correct, count = train_step(inputs, targets, lr_at(cfg, epoch, step, steps))
                loss_sum += loss * count
                correct_sum += correct
                count_sum += count
                progress.update(step, lambda s=loss_sum, c=count_sum: f"loss {s.item() / max(c.item(), 1):.4f}")
                if flag.stop and step + 1 < steps:
                    # Stop mid-epoch: save the exact position and the epoch's sums so far.
                    _sync(device)
                    progress.clear()
                    partial_state = dict(loss=loss_sum.item(), correct=correct_sum.item(), count=count_sum.item(),
                                         time=elapsed + time.perf_counter() - started, device=ran_on)
                    _save(ckpt_path, checkpoint_state(epoch, step + 1, partial_state))
                    write_metrics(out_dir, history)
                    raise Interrupted(ckpt_path)
            _sync(device)
            train_time = elapsed + time.perf_counter() - started
            progress.clear()
            history.append(_finish_epoch(cfg, model, data, autocast, epoch, form, lr_at(cfg, epoch, steps - 1, steps),
                                         loss_sum, correct_sum, count_sum, train_time, kind, monitor, log,
                                         graphed_steps=train_step.replays - replays, device=ran_on))
            _save(ckpt_path, checkpoint_state(epoch + 1, 0, None))
            write_metrics(out_dir, history)
            if flag.stop:
                raise Interrupted(ckpt_path)

    torch.save(model.state_dict(), os.path.join(out_dir, "model.pt"))
    result = dict(schedule=schedule, history=history, final=history[-1] if history else None,
                  params=dict(dense=dense_params, converted=summary.params_after if summary else None,
                              rank_ratio=cfg["rank_ratio"] if schedule != "full" else 1.0),
                  inflate_epoch=cfg["inflate_epoch"] if schedule == "dynamic" else None,
                  deflate_epoch=cfg["deflate_epoch"] if schedule == "dynamic" else None,
                  conversion=str(summary) if summary else None,
                  converted_layers=summary.converted if summary else None, out_dir=out_dir, config=cfg)
    if monitor is not None:
        result["monitor_files"] = monitor.finish(out_dir)
        result["monitor_records"] = monitor.state_dict()["records"]
    write_json(result_path, result)
    return result


def _model_form(model):
    forms = {m.form for m in model.modules() if hasattr(m, "inflate") and hasattr(m, "form")}
    return "/".join(sorted(forms)) if forms else "full"


def _finish_epoch(cfg, model, data, autocast, epoch, form, lr, loss_sum, correct_sum, count_sum, train_time,
                  kind, monitor, log, graphed_steps=0, device=None):
    count = max(count_sum.item(), 1.0)
    eval_started = time.perf_counter()
    val_loss, val_acc = evaluate(model, data, autocast)
    record = dict(epoch=epoch, form=form, lr=lr, train_loss=loss_sum.item() / count,
                  train_acc=correct_sum.item() / count, val_loss=val_loss, val_acc=val_acc,
                  val_bpb=val_loss / math.log(2) if kind == "text" else None,
                  train_time=train_time, eval_time=time.perf_counter() - eval_started,
                  trainable_params=count_parameters(model), graphed_steps=graphed_steps, device=device)
    if monitor is not None:
        monitor.record_epoch(epoch, record)
    log(_epoch_line(cfg, record, kind))
    return record

