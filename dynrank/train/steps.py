"""One optimizer step on a batch, run eagerly or replayed from a CUDA graph.

A ResNet20 step at batch 128 is a few hundred small kernels, and on a fast GPU
it looks bound by the host's time to launch them (7.7 ms on an H200 at 4
TFLOP/s; the factorized forms, with fewer FLOPs, take longer).  With
``cuda_graphs`` on, :class:`TrainStep`
captures the whole step (forward, loss, backward, optimizer) once and then
replays it with a single launch per batch: the batch is copied into the
graph's fixed input buffers and the loss and correct count come back in fixed
output buffers.

A captured graph bakes in the parameter storage and the learning rate, so it
is captured again whenever either changes (a form change at an epoch boundary
replaces parameters; an LR decay changes the rate).  Before each capture the
step runs eagerly ``warmup`` times with the new parameters or rate: the
optimizer then holds its state (SGD's momentum buffers are created on a
parameter's first step, which must not be what a graph records) and cuDNN has
chosen its algorithms.  Those warm-up steps are real training steps on real
batches, so training sees every batch exactly once either way.  A batch of
another shape (the short last batch of an epoch) runs eagerly.  Should a
capture fail, the run says so and carries on eagerly.
"""

import torch
from torch.nn import functional as F

from .._args import check_int

__all__ = ["TrainStep", "loss_and_correct", "upcast_logits", "CudaGraphs"]


def upcast_logits(logits):
    """``logits`` in float32 where they are 16-bit floats (bf16/fp16 autocast), else as they are.

    The loss of a float64 model stays float64; a bare ``.float()`` would round it to float32.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float()
    return logits


def loss_and_correct(logits, targets, label_smoothing):
    """Cross-entropy over the flattened batch, number of correct argmax predictions, element count.

    16-bit logits are lifted to float32 first (:func:`upcast_logits`); float32 and float64 stay.
    """
    logits = upcast_logits(logits.reshape(-1, logits.shape[-1]))
    targets = targets.reshape(-1)
    loss = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    correct = (logits.argmax(-1) == targets).sum()
    return loss, correct, targets.numel()


class CudaGraphs:
    """Capture and replay through ``torch.cuda.CUDAGraph``, with warm-up on a side stream."""

    def __init__(self, device):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, got {self.device}")
        self._side = None

    def warmup(self, fn):
        """Run ``fn`` on a side stream (as graph capture wants its warm-up iterations run)."""
        if self._side is None:      # one stream for every warm-up: its memory stays in one pool
            self._side = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            result = fn()
        current.wait_stream(self._side)
        return result

    def capture(self, fn, optimizer):
        """Record ``fn`` (nothing runs yet) and return the graph's replay function.

        The graph keeps ``optimizer``'s learning rates and the storage of its
        parameters, gradients and state as they are now.
        """
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay


class TrainStep:
    """``step(inputs, targets, lr) -> (loss, correct, count)``: one training step, graphed where it can be.

    Args:
        model: the module whose parameters ``optimizer`` updates.
        optimizer: an optimizer whose ``step`` can be captured (SGD; Adam/AdamW
            only with ``capturable=True``).
        forward: the callable that maps inputs to logits (``model`` or a compiled wrapper).
        autocast: a factory of the autocast context, ``autocast(cache=True)`` (see :mod:`.loop`);
            a capture calls it with ``cache=False``, as CUDA graphs require.
        label_smoothing: for the cross-entropy.
        cuda_graphs: capture and replay the step (CUDA only).
        warmup: eager steps before each capture (≥ 1: the optimizer state must exist).
        graphs: the capture backend, with ``warmup(fn)`` and ``capture(fn, optimizer)``
            (default: :class:`CudaGraphs` on the model's device).
        log: where the fallback message goes if a capture fails.

    The returned ``loss`` and ``correct`` are tensors on the device; with graphs
    they are the graph's output buffers, valid until the next call, the loss in
    the dtype an eager step gives it (float64 for a float64 model).
    """

    def __init__(self, model, optimizer, forward, autocast, label_smoothing, cuda_graphs=False, warmup=2,
                 graphs=None, log=print):
        warmup = check_int(warmup, "warmup", "an int ≥ 1 (the optimizer state must exist before a capture)", 1)
        self.model, self.optimizer, self.forward = model, optimizer, forward
        self.autocast, self.label_smoothing = autocast, label_smoothing
        self.warmup, self.log = warmup, log
        self.enabled = bool(cuda_graphs)
        self.graphs = graphs
        if self.enabled and graphs is None:
            self.graphs = CudaGraphs(next(model.parameters()).device)
        self.captures = 0          # graphs captured so far (each form and LR gets one)
        self.replays = 0           # steps served by a replay
        self._replay = None
        self._key = None           # (lr, train mode, parameter storage) the current graph was captured for
        self._shape = None         # (inputs, targets) layout every graphed batch must have
        self._pending, self._seen = None, 0
        self._loss_dtype = None    # of the last warm-up step's loss: the graph's loss buffer keeps it
        self._static = None

    def _run(self, inputs, targets, cache=True):
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast(cache=cache):
            logits = self.forward(inputs)
        loss, correct, count = loss_and_correct(logits, targets, self.label_smoothing)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), correct, count

    def __call__(self, inputs, targets, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if not self.enabled:
            return self._run(inputs, targets)
        shape = _layout(inputs) + _layout(targets)
        if self._shape is None or (shape != self._shape and inputs.shape[:1] > self._shape[0][:1]):
            # The graphed layout is the largest batch's: a run resumed at an epoch's short last batch saw
            # that one first, and would otherwise have run every full batch after it eagerly.
            if self._shape is not None:
                self._replay = self._key = self._pending = None
                self._seen = 0
            self._shape = shape
        if shape != self._shape:       # the short last batch: eager, keeping the graph
            return self._run(inputs, targets)
        storage = tuple(p.data_ptr() for group in self.optimizer.param_groups for p in group["params"])
        key = (lr, self.model.training, storage)
        if self._replay is None or key != self._key:
            self._replay = None
            if key != self._pending:
                self._pending, self._seen = key, 0
            if self._seen < self.warmup:
                self._seen += 1
                loss, correct, count = self.graphs.warmup(lambda: self._run(inputs, targets))
                self._loss_dtype = loss.dtype
                return loss, correct, count
            if not self._capture(inputs, targets, key):
                return self._run(inputs, targets)
        self._static[0].copy_(inputs)
        self._static[1].copy_(targets)
        self._replay()
        self.replays += 1
        return self._static[2], self._static[3], targets.numel()

    def _capture(self, inputs, targets, key):
        static_in, static_tg = torch.empty_like(inputs), torch.empty_like(targets)   # filled before each replay
        # The eager loss's dtype: a float64 model's loss stays float64 (see upcast_logits).
        out_loss = torch.zeros((), device=inputs.device, dtype=self._loss_dtype)
        out_correct = torch.zeros((), device=inputs.device, dtype=torch.int64)

        def step():
            loss, correct, _ = self._run(static_in, static_tg, cache=False)
            out_loss.copy_(loss)
            out_correct.copy_(correct)
        try:
            replay = self.graphs.capture(step, self.optimizer)
        except RuntimeError as err:
            self.enabled = False
            self.log(f"note: CUDA graph capture failed, training on without graphs ({str(err).splitlines()[0]})")
            return False
        self._replay, self._key = replay, key
        self._static = (static_in, static_tg, out_loss, out_correct)
        self.captures += 1
        return True


def _layout(tensor):
    return tensor.shape, tensor.stride(), tensor.dtype
