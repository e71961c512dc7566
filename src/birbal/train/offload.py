"""train.offload_layers: chosen decoder layers run without gradient checkpointing, their saved activations held in
pinned host memory between the forward and the backward instead of on the GPU, on copy streams of their own.

Why: gradient checkpointing recomputes every checkpointed layer's forward in the backward (2N of the 6N FLOP a
token of a frozen-base step); keeping a layer's activations on a 24 GiB card costs ~1.6 GiB a layer at 16,384
tokens. Offloading trades that memory for PCIe traffic, which runs beside the compute: the device-to-host copy of
a layer's tensors is queued on its own stream as they are saved, and the host-to-device copy of the next
offloaded layer (in backward order) is queued as the backward of the one above it starts, so the copies overlap
the backward of the layers in between. Same tensors, same kernels: the loss and gradients are those of
checkpointing (tests/test_train_offload.py).

Why hand-written and not TRL's `OffloadActivations` (trl/models/activation_offloading.py, adapted from torchtune,
whose own releases stopped at 0.6.1): theirs brings each tensor back only when the backward asks for it and makes
the compute stream wait for that copy, so every byte of the host-to-device traffic is on the critical path. At the
H200's ~50 GB/s a layer's 1.6 GB then stalls the backward ~33 ms, about what recomputing the layer costs; on a
4090 (PCIe 4.0, ~25 GB/s) ~66 ms, again about a layer's recompute. Prefetching one offloaded layer ahead is the
part that makes it pay, and it needs to know layers, which a whole-model context manager does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from birbal.errors import TrainError
from birbal.models import unwrap_peft

# Saved tensors smaller than this stay on the GPU: LoRA weights' bf16 casts (1-3.5 MiB), norms' per-token
# statistics. At 16,384 tokens every per-token activation of d_model width is 128 MiB, a LoRA rank-128 one 4 MiB.
MIN_OFFLOAD_BYTES = 4 * 2**20
# Offloaded layers whose device-to-host copies may be in flight at once in the forward (their GPU memory is held
# until copied). The backward fetches one layer ahead.
COPIES_IN_FLIGHT = 2


def offloaded_layer_indices(num_layers: int, unchecked: int, count: int) -> list[int]:
    """`count` layers spread evenly over the checkpointed ones (0 .. num_layers - unchecked - 1).

    Spread, not bunched: between two offloaded layers sit checkpointed ones, whose forward gives the
    device-to-host copy time and whose recompute and backward give the next host-to-device copy time.
    """
    checked = num_layers - unchecked
    if count > checked:
        raise TrainError(f"train.offload_layers={count} is more than the {checked} checkpointed decoder layers "
                         f"({num_layers} layers, train.unchecked_layers={unchecked})")
    if count <= 0:
        return []
    # the centres of `count` equal slices of the checked layers; distinct because count <= checked
    return sorted({int((i + 0.5) * checked / count) for i in range(count)})


@dataclass
class _Layer:
    """One offloaded layer's saved tensors for the micro-batch in flight."""
    host: list[torch.Tensor] = field(default_factory=list)  # pinned host copies (CPU: plain copies)
    uses: list[int] = field(default_factory=list)  # handles not yet unpacked, per entry
    by_id: dict[int, int] = field(default_factory=dict)  # id(tensor) -> entry, while the forward holds them
    pending: list[torch.Tensor] = field(default_factory=list)  # GPU tensors whose copy to the host is queued
    copied: torch.cuda.Event | None = None  # the device-to-host copies are done
    gpu: list[torch.Tensor | None] | None = None  # brought back (or being brought back) for the backward
    ready: torch.cuda.Event | None = None
    waited: bool = False


class ActivationOffload:
    """Saved-tensor hooks for the layers in `indices`; `install(model)` wires them in."""

    def __init__(self, device: torch.device, indices: list[int], min_bytes: int = MIN_OFFLOAD_BYTES):
        self.device = device
        self.indices = sorted(indices)  # the active ones (set_active); all of `members` unless changed
        self.members = list(self.indices)  # the layers given the offloading __call__ at install
        self.trigger_index: int | None = None  # the layer whose backward's start fetches the top active one
        self._layers = None
        self.min_bytes = min_bytes
        self.cuda = device.type == "cuda"
        self.d2h = torch.cuda.Stream(device) if self.cuda else None
        self.h2d = torch.cuda.Stream(device) if self.cuda else None
        self.layers: dict[int, _Layer] = {}
        self.bytes_offloaded = 0  # in the last forward, for the benchmark and the host-RAM estimate
        self.peak_host_bytes = 0
        self._host_bytes = 0
        self.late_fetches = 0  # layers the backward reached before they were fetched (no hook fired ahead)
        # what the first offloaded layer saved in the last forward, for the benchmark: (shape, dtype, bytes, moved)
        self.first_layer_saved: list[tuple[tuple[int, ...], str, int, bool]] = []
        self.parameter_storages: set[int] = set()  # weights (4-bit ones too) saved by a matmul stay where they are

    # ---- the forward ----------------------------------------------------------------------------------------------
    def begin(self, index: int) -> None:
        if index == self.indices[0]:
            self.bytes_offloaded = 0
            self.first_layer_saved = []
        earlier = [i for i in self.indices if i < index]
        if self.cuda and len(earlier) >= COPIES_IN_FLIGHT:
            previous = self.layers.get(earlier[-COPIES_IN_FLIGHT])
            if previous is not None and previous.copied is not None:
                # Where the link is slower than the compute, the compute waits here (a measured stall) instead of
                # the GPU filling up with tensors not yet copied, which under the memory cap would make the caching
                # allocator free and re-allocate its whole cache.
                torch.cuda.current_stream(self.device).wait_event(previous.copied)
        self._drop(index)  # a micro-batch whose backward never reached this layer leaves nothing behind
        self.layers[index] = _Layer()

    def pack(self, index: int, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        handle = self._pack(index, tensor, nbytes)
        if index == self.indices[0]:
            self.first_layer_saved.append((tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), nbytes,
                                           not isinstance(handle, torch.Tensor)))
        return handle

    def _pack(self, index: int, tensor: torch.Tensor, nbytes: int):
        if (tensor.device.type != self.device.type or nbytes < self.min_bytes
                or isinstance(tensor, torch.nn.Parameter) or tensor.layout != torch.strided
                or tensor.untyped_storage().data_ptr() in self.parameter_storages):
            return tensor  # kept where it is
        layer = self.layers[index]
        entry = layer.by_id.get(id(tensor))
        if entry is not None and layer.host[entry].shape == tensor.shape:  # the same tensor saved twice
            layer.uses[entry] += 1
            return (index, entry)
        host = torch.empty_like(tensor, device="cpu", pin_memory=self.cuda)
        if host.stride() != tensor.stride():  # overlapping or not dense (an expand): kept, rare and small
            return tensor
        if self.cuda:
            self.d2h.wait_stream(torch.cuda.current_stream(self.device))  # the tensor is written by now
            with torch.cuda.stream(self.d2h):
                host.copy_(tensor, non_blocking=True)
        else:
            host.copy_(tensor)
        layer.pending.append(tensor)  # held until the layer's forward ends: ids stay unique, copies read it
        layer.by_id[id(tensor)] = len(layer.host)
        layer.host.append(host)
        layer.uses.append(1)
        self.bytes_offloaded += nbytes
        self._host_bytes += nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self._host_bytes)
        return (index, len(layer.host) - 1)

    def end(self, index: int, output) -> None:
        layer = self.layers[index]
        layer.by_id.clear()
        if self.cuda:
            layer.copied = self.d2h.record_event()
            for tensor in layer.pending:
                # the caching allocator will not hand this memory out again before the copy has read it
                tensor.record_stream(self.d2h)
        layer.pending.clear()
        if not layer.host:  # everything it saved was small: nothing to fetch
            del self.layers[index]
        hidden = output[0] if isinstance(output, tuple) else output
        below = [i for i in self.indices if i < index]
        if below and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            # fires when the gradient of this layer's output is ready: its backward starts, the layer below is
            # fetched meanwhile
            hidden.register_hook(lambda grad, nxt=below[-1]: self.prefetch(nxt))

    def fetch_top(self, _grad=None) -> None:
        """The top offloaded layer is fetched as the backward of the layer above it starts (or, when it is the last
        layer, of the final norm): late enough that the peak at the backward's start is not raised by it."""
        if self.indices:
            self.prefetch(self.indices[-1])

    def trigger(self, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(self.fetch_top)

    # ---- the backward ---------------------------------------------------------------------------------------------
    def prefetch(self, index: int) -> None:
        layer = self.layers.get(index)
        if layer is None or layer.gpu is not None:  # nothing moved, or on its way already
            return
        if not self.cuda:
            layer.gpu = list(layer.host)
            return
        # Allocated on the compute stream, written on the copy stream. The caching allocator hands a freed block
        # out again only to the stream that allocated it, so tensors made on the copy stream would build a pool of
        # their own beside the compute stream's, about two offloaded layers large, that the compute stream cannot
        # reuse: with 15 layers offloaded the allocator reached the 24 GiB cap (reserved 24.00 GiB for 15.88
        # allocated, benchmarks/results README, seventh and twenty-first sessions) and had to empty its cache.
        compute = torch.cuda.current_stream(self.device)
        layer.gpu = [torch.empty_like(h, device=self.device) for h in layer.host]
        self.h2d.wait_stream(compute)  # the blocks may have been freed by compute work still queued
        self.h2d.wait_event(layer.copied)
        with torch.cuda.stream(self.h2d):
            for gpu, host in zip(layer.gpu, layer.host, strict=True):
                gpu.copy_(host, non_blocking=True)
            layer.ready = self.h2d.record_event()

    def unpack(self, handle):
        if isinstance(handle, torch.Tensor):
            return handle
        index, entry = handle
        layer = self.layers[index]
        if layer.gpu is None:
            self.late_fetches += 1
            self.prefetch(index)  # not fetched ahead: no hook fired before this layer's backward
        tensor = layer.gpu[entry]
        if self.cuda and not layer.waited:
            # made on this stream (prefetch): once it has waited for the copy, it uses and frees them in order
            torch.cuda.current_stream(self.device).wait_event(layer.ready)
            layer.waited = True
        layer.uses[entry] -= 1
        if layer.uses[entry] == 0:  # autograd holds it from here; we let go
            layer.gpu[entry] = None
            self._host_bytes -= layer.host[entry].numel() * layer.host[entry].element_size()
            layer.host[entry] = torch.empty(0)
            if not any(layer.uses):
                del self.layers[index]
        return tensor

    def _drop(self, index: int) -> None:
        layer = self.layers.pop(index, None)
        if layer is not None:
            if self.cuda and layer.ready is not None and not layer.waited:
                # fetched but never used (a backward that stopped short): its blocks go back to the compute
                # stream's pool here, so that stream must not run past the copy still writing them
                torch.cuda.current_stream(self.device).wait_event(layer.ready)
            self._host_bytes -= sum(h.numel() * h.element_size() for h in layer.host)

    # ---- wiring ---------------------------------------------------------------------------------------------------
    def hooks(self, index: int) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(lambda t: self.pack(index, t), self.unpack)

    def install(self, model) -> None:
        """Turn checkpointing off for the chosen layers and run each under this object's hooks.

        Outside the layer's `__call__`, so outside a compiled layer (`nn.Module.compile` compiles `_call_impl`)
        and outside transformers' checkpointing wrapper (around `__call__` in 5.17, around `forward` in 5.24).
        The layer's class is swapped for a subclass that only adds that `__call__`: parameter names, the
        adapter's state dict and checkpoints are unchanged.
        """
        core = unwrap_peft(model)
        layers = core.model.layers
        self._layers = layers
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        wrapped = list(self.members)
        if self.members[-1] + 1 < len(layers):  # the layer above the top one fetches it as its backward starts
            wrapped.append(self.members[-1] + 1)
        for index in wrapped:
            layers[index].__class__ = _offloaded_class(type(layers[index]))
            layers[index]._birbal_offload = (self, index)
        self._wrapped = wrapped

        def on_norm_input(_module, args):  # when no layer above the top active one is wrapped
            if torch.is_grad_enabled() and self.indices and self.trigger_index is None:
                self.trigger(args[0])

        core.model.norm.register_forward_pre_hook(on_norm_input)
        self.set_active(self.members)

    def set_active(self, indices: list[int]) -> None:
        """Offload these (a subset of the installed layers; the others are checkpointed again). The benchmark
        compares settings on one loaded, compiled model with it: the layers' class does not change, so nothing
        is compiled again."""
        if not set(indices) <= set(self.members):
            raise TrainError(f"offload: layers {sorted(set(indices) - set(self.members))} were not installed")
        if any(layer.host for layer in self.layers.values()):
            raise TrainError("offload: set_active between micro-batches only")
        self.indices = sorted(indices)
        self.bytes_offloaded = 0
        self.first_layer_saved = []
        for index in self.members:
            self._layers[index].gradient_checkpointing = index not in self.indices
        above = [i for i in self._wrapped if self.indices and i > self.indices[-1]]
        self.trigger_index = above[0] if above else None


_OFFLOADED_CLASSES: dict[type, type] = {}


def _offloaded_class(cls: type) -> type:
    if getattr(cls, "_birbal_offloaded", False):
        return cls
    if cls not in _OFFLOADED_CLASSES:
        def __call__(self, *args, **kwargs):
            offload, index = self._birbal_offload
            if not (self.training and torch.is_grad_enabled()):
                return super(sub, self).__call__(*args, **kwargs)
            if index not in offload.indices:  # checkpointed (or unchecked) as any other layer
                output = super(sub, self).__call__(*args, **kwargs)
                if index == offload.trigger_index:
                    offload.trigger(output)
                return output
            offload.begin(index)
            with offload.hooks(index):
                output = super(sub, self).__call__(*args, **kwargs)
            offload.end(index, output)
            return output

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "_birbal_offloaded": True,
                                          "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _OFFLOADED_CLASSES[cls] = sub
    return _OFFLOADED_CLASSES[cls]


def install_offload(model, device: torch.device, unchecked: int, count: int) -> ActivationOffload | None:
    layers = unwrap_peft(model).model.layers
    indices = offloaded_layer_indices(len(layers), unchecked, count)
    if not indices:
        return None
    offload = ActivationOffload(device, indices, MIN_OFFLOAD_BYTES)
    offload.install(model)
    return offload
