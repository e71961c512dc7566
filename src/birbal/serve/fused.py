"""`serve.decode_fuse: projections`: the projections that read one input computed as one product.

In each decoder layer q_proj, k_proj and v_proj read the same normed hidden state, and so do the MLP's gate_proj
and up_proj. At batch 1 a decode step's products are matrix-vector products, each a kernel that streams its
weight; a small one (k_proj, v_proj: 8 MiB; a LoRA A: 1 MiB) costs its launch and tail more than its bytes. Here
each group's weights are rows of one matrix (the members' own weights become views of it: no extra memory), and
the first member's call computes the whole group's output in one product; the others take their slice of it. Each
output element is the same dot product over the same input as before (a GEMV's rows are independent), so the maths
is the model's; the kernel may sum a row in another order (float rounding only: tests/test_serve_fused.py compares
with the unfused model).

For the unmerged adapter (peft's LoRA `Linear`, birbal-4090's served model) the base weights of a group are fused
the same way, and so are the adapter's A matrices (three 128 x 4096 products become one 384 x 4096); each member
then adds its own B product as peft does: `result + lora_B(lora_A(dropout(x))) * scaling` (peft 0.21,
peft/tuners/lora/layer.py `Linear.forward`), with the eval-mode dropout as the identity it is. Any call that is not
that plain case (training, adapters disabled or merged, several adapters, a LoRA variant such as DoRA, extra
arguments) runs peft's own forward, which reads the same (view) weights.

How the group's members meet: the first member (q_proj, gate_proj) computes the fused output and hands each later
member its slice with the input it was computed from; a later member uses it only when it is called on that very
tensor (`is`), and clears it, so nothing is kept past the layer's forward. Under torch.compile the hand-over is
traced like any attribute of the module: one product in the graph, the same graph for every layer (the fused
weight is a buffer of the module, an input like its parameters).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from birbal.errors import ServeError
from birbal.models import plain_lora_parts, unwrap_peft
from birbal.serve import gemv as gemv_kernel

GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))
FUSED = "_birbal_fused_weight"  # the first member's buffer: the group's weights, one above the other
FUSED_A = "_birbal_fused_lora_a"  # the first member's buffer: the group's LoRA A matrices
HANDED = "_birbal_handed"  # a later member's (input, its output slice[, its LoRA A slice]) for this forward
_ATTR = "_birbal_fused_groups"


def _fuse(weights: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One matrix holding `weights` as row blocks, and each block as a view of it (the old storages freed)."""
    fused = torch.cat([w.detach() for w in weights], dim=0)
    views, start = [], 0
    for w in weights:
        views.append(fused[start:start + w.shape[0]])
        start += w.shape[0]
    return fused, views


def _set_weight(linear: torch.nn.Linear, view: torch.Tensor) -> None:
    linear.weight = torch.nn.Parameter(view, requires_grad=linear.weight.requires_grad)


def _plain_lora_call(member, x, args, kwargs) -> bool:
    """peft's vanilla path with dropout an identity: the only call the fused forward computes itself."""
    if args or kwargs or member.training or member.disable_adapters or member.merged:
        return False
    if list(member.active_adapters) != [member._birbal_adapter]:
        return False
    dropout = member.lora_dropout[member._birbal_adapter]
    return not dropout.training and x.dtype == member._birbal_lora_a.weight.dtype


def _product(self, x, weight, lora_a: bool = False):
    """`F.linear(x, weight)`; inside a compiled decode step (one row) under serve.decode_gemv "lora_a" or "triton"
    (LoRA A products) or "all" (every product), written as the fp32 products' sum, `(x * w).float().sum(-1)`, so
    that Inductor makes it one Triton reduction kernel (cuBLAS runs a small product as a split-K kernel plus a
    reduce kernel); under "triton" every other one-row product on CUDA, compiled or eager, through
    birbal.serve.gemv's kernel. The same dot products accumulated in fp32, in another order (float rounding
    only)."""
    how = self._birbal_gemv
    one_row = x.numel() == x.shape[-1]
    if how == "all" or (lora_a and how in ("lora_a", "triton")):
        if torch.compiler.is_compiling() and one_row:
            return (x.unsqueeze(-2).float() * weight.float()).sum(-1).to(x.dtype)
    elif how == "triton" and gemv_kernel.applies(x, weight):
        return gemv_kernel.gemv(x, weight)
    return F.linear(x, weight)


# ---- the forwards (bound to each member module; their state lives on the modules, so that one compiled graph
# ---- serves every layer: nothing per layer but module attributes and buffers) -----------------------------------
def _hand_out(self, x, out):
    """Each later member's slice of the group's product `out` (with the input it was computed from); the first
    member's own slice returned."""
    start = 0
    for size, later in zip(self._birbal_sizes, (self, *self._birbal_later), strict=True):
        if later is not self:
            setattr(later, HANDED, (x, out[..., start:start + size]))
        start += size
    return out[..., :self._birbal_sizes[0]]


def _first_linear(self, x):
    return _hand_out(self, x, _product(self, x, getattr(self, FUSED)))


def _single_linear(self, x):
    """A projection fused with nothing (merged o_proj, down_proj; lm_head under "triton") whose product
    serve.decode_gemv "all" or "triton" writes."""
    return _product(self, x, self.weight)


def _later_linear(self, x):
    handed = getattr(self, HANDED)
    if handed is not None and handed[0] is x:
        setattr(self, HANDED, None)
        return handed[1]
    return F.linear(x, self.weight)


def _first_lora(self, x, *args, **kwargs):
    if not _plain_lora_call(self, x, args, kwargs):
        return self._birbal_peft_forward(x, *args, **kwargs)
    base = _product(self, x, getattr(self, FUSED))
    down = _product(self, x, getattr(self, FUSED_A), lora_a=True)
    start, start_a = 0, 0
    for size, rank, later in zip(self._birbal_sizes, self._birbal_ranks, (self, *self._birbal_later), strict=True):
        if later is not self:
            setattr(later, HANDED, (x, base[..., start:start + size], down[..., start_a:start_a + rank]))
        start += size
        start_a += rank
    return _add_lora(self, base[..., :self._birbal_sizes[0]], down[..., :self._birbal_ranks[0]])


def _later_lora(self, x, *args, **kwargs):
    handed = getattr(self, HANDED)
    if handed is not None and handed[0] is x and _plain_lora_call(self, x, args, kwargs):
        setattr(self, HANDED, None)
        return _add_lora(self, handed[1], handed[2])
    setattr(self, HANDED, None)
    return self._birbal_peft_forward(x, *args, **kwargs)


def _scaled_down(self, x):
    """decode_fuse lora's second input: the group's LoRA A product over `x` (one product), times the scaling."""
    return _product(self, x, getattr(self, FUSED_A), lora_a=True) * self.scaling[self._birbal_adapter]


def _first_lora_in_base(self, x, *args, **kwargs):
    """`serve.decode_fuse: lora`: lora_A for the group (one product), then the base and every B in one product
    over [x, scaling * down]: the B matrices are columns of the base's matrix (zeros where another member's)."""
    if not _plain_lora_call(self, x, args, kwargs):
        return self._birbal_peft_forward(x, *args, **kwargs)
    scaled, weight = _scaled_down(self, x), getattr(self, FUSED)
    if self._birbal_split_input and self._birbal_gemv == "triton" and gemv_kernel.applies2(x, scaled, weight):
        # serve.decode_gemv_split_input: the kernel reads x, then the scaled LoRA term, in place: [x, scaled] is
        # never written (the same products in the same order as over the concatenation where x's length is a
        # multiple of the K step)
        out = gemv_kernel.gemv2(x, scaled, weight)
    else:
        out = _product(self, torch.cat([x, scaled], dim=-1), weight)
    return _hand_out(self, x, out)


def _glu_mlp(self, x):
    """serve.decode_gemv_glu: the MLP of `down_proj(act_fn(gate_proj(x)) * up_proj(x))` (transformers' Mistral and
    Llama MLPs) with, for one CUDA row, silu(gate) * up written by the fused gate/up product's kernel instead of
    the product (then a kernel of its own making the activation); any other call as transformers computes it."""
    act = self.gate_proj._birbal_act_product(self.gate_proj, x)
    if act is None:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return self.down_proj(act)


def _act_linear(self, x):
    """Merged gate/up's activation from its one product (None: not this kernel's call)."""
    weight = getattr(self, FUSED)
    if self._birbal_gemv != "triton" or not gemv_kernel.applies_act(x, weight):
        return None
    return gemv_kernel.gemv_act(x, weight)


def _act_lora_in_base(self, x):
    """decode_fuse lora's gate/up activation: the LoRA A product for the group, then [W, B] over [x, scaling * A
    x] in one kernel that writes silu(gate) * up, gate and up each the base output plus its LoRA term as
    `_first_lora_in_base` computes them (None: not this call)."""
    one_cuda_row = x.is_cuda and x.numel() == x.shape[-1]
    if not one_cuda_row or self._birbal_gemv != "triton" or not _plain_lora_call(self, x, (), {}):
        return None  # checked before the LoRA A product: a prompt's rows take the plain path, which makes its own
    weight, scaled = getattr(self, FUSED), _scaled_down(self, x)
    if self._birbal_split_input and gemv_kernel.applies_act(x, weight, scaled):
        return gemv_kernel.gemv_act(x, weight, scaled)
    row = torch.cat([x, scaled], dim=-1)
    return gemv_kernel.gemv_act(row, weight) if gemv_kernel.applies_act(row, weight) else None


def _later_lora_in_base(self, x, *args, **kwargs):
    handed = getattr(self, HANDED)
    if handed is not None and handed[0] is x and _plain_lora_call(self, x, args, kwargs):
        setattr(self, HANDED, None)
        return handed[1]
    setattr(self, HANDED, None)
    return self._birbal_peft_forward(x, *args, **kwargs)


def _add_lora(self, result, down):
    """peft's `result = result + lora_B(lora_A(dropout(x))) * scaling`, then `result.to(torch_result_dtype)`,
    with lora_A(dropout(x)) = `down` (eval dropout is the identity)."""
    dtype = result.dtype
    result = result + self._birbal_lora_b(down) * self.scaling[self._birbal_adapter]
    return result.to(dtype)


SINGLES = (("self_attn", ("o_proj",)), ("mlp", ("down_proj",)))  # `lora`: B into the base, one projection each


GEMVS = ("cublas", "lora_a", "triton", "all")  # serve.decode_gemv


def fuse_projections(model, mode: str = "projections", gemv: str = "cublas", split_input: bool = False,
                     glu: bool = False) -> dict:
    """Fuse every decoder layer's shared-input projections of `model` (plain bf16/fp32 `nn.Linear`s, merged, or
    peft LoRA `Linear`s over them) in place. A group it cannot fuse exactly is left as it is, with the reason:
    a quantized base (bitsandbytes' packed weights), a group that mixes LoRA and plain layers, a bias, several
    adapters, a LoRA variant, or LoRA weights in another dtype than the base's. `mode` "lora" (serve.decode_fuse)
    also puts each LoRA B into its base's product (o_proj and down_proj too, each a group of one): the base output
    and the LoRA term summed in one product's accumulator instead of each rounded to the dtype first (float
    rounding: tests/test_serve_fused.py). `split_input` (serve.decode_gemv_split_input), under "lora" and gemv
    "triton" on CUDA: each [W, B] product reads [x, scaling * A x] from its two halves (birbal.serve.gemv's
    `gemv2`) instead of a written concatenation. `glu` (serve.decode_gemv_glu), with gemv "triton" on CUDA: each
    SiLU MLP whose gate/up are one fused product of ours has that product's kernel write silu(gate) * up
    (`gemv_act`) instead of gate and up. Returns
    {"mode", "gemv", "split_input", "glu", "fused": groups fused, "skipped": {reason: groups}} (with glu, also
    "glu_mlps": MLPs so computed). Idempotent for one mode."""
    if mode not in ("projections", "lora"):
        raise ServeError(f"serve.decode_fuse must be none, projections or lora; given {mode!r}")
    if gemv not in GEMVS:
        raise ServeError(f"serve.decode_gemv must be one of {', '.join(GEMVS)}; given {gemv!r}")
    core = unwrap_peft(model)
    if getattr(core, _ATTR, None) is not None:
        done = getattr(core, _ATTR)
        if (done["mode"], done["gemv"], done["split_input"], done["glu"]) != (mode, gemv, split_input, glu):
            raise ServeError(f"the model's projections are already fused as {done['mode']!r} with gemv "
                             f"{done['gemv']!r} (split input {done['split_input']}, glu {done['glu']}), not "
                             f"{mode!r} with {gemv!r} (split input {split_input}, glu {glu})")
        return done
    layers = getattr(getattr(core, "model", None), "layers", None)
    if not layers:
        raise ServeError(f"serve.decode_fuse=projections needs decoder layers at .model.layers; "
                         f"{type(core).__name__} has none")
    report: dict = {"mode": mode, "gemv": gemv, "split_input": split_input, "glu": glu, "fused": 0, "skipped": {}}
    kernel = gemv
    if gemv == "triton":
        # the kernel runs on CUDA only; elsewhere (the smoke profile's CPU server) the products stay F.linear and
        # the report says so: the LoRA A reductions of "lora_a" still apply inside a compiled step
        on_cuda = next(core.parameters()).is_cuda
        why_not = gemv_kernel.available() if on_cuda else "the model is not on a CUDA device"
        report["gemv_kernel"] = f"{gemv_kernel.OP} (Triton)" if why_not is None else f"F.linear: {why_not}"
        kernel = "triton" if why_not is None else "lora_a"
    peft = isinstance(model, _peft_model_types())
    groups = GROUPS + (SINGLES if (mode == "lora" and peft) or (kernel in ("all", "triton") and not peft) else ())
    for layer in layers:
        for parent_name, names in groups:
            parent = getattr(layer, parent_name, None)
            members = [getattr(parent, n, None) for n in names]
            reason = ("missing" if parent is None or any(m is None for m in members)
                      else _fuse_group(members, lora_in_base=mode == "lora", gemv=kernel, split_input=split_input))
            if reason is None:
                report["fused"] += 1
            else:
                key = f"{parent_name}: {reason}"
                report["skipped"][key] = report["skipped"].get(key, 0) + 1
    if glu and gemv == "triton":  # installed wherever asked: each call takes the kernel only where it applies
        report["glu_mlps"] = sum(_install_glu(layer) for layer in layers)
    head = getattr(core, "lm_head", None)
    if kernel == "triton" and head is not None and _plain(head):
        object.__setattr__(head, "_birbal_gemv", kernel)
        head.forward = types.MethodType(_single_linear, head)
        report["lm_head"] = report["gemv_kernel"]
    object.__setattr__(core, _ATTR, report)
    if report["fused"] and torch.cuda.is_available():
        # the replaced weights' blocks back to the device (the fused copies were made one group at a time; on a
        # 24 GB card the caching allocator should not hold the old ones beside the model)
        torch.cuda.empty_cache()
    return report


def _plain(linear) -> bool:
    """An unquantized nn.Linear without a bias (a bitsandbytes Linear4bit is a subclass: its weight is packed)."""
    return type(linear) is torch.nn.Linear and linear.bias is None and linear.weight.is_floating_point()


def _install_glu(layer) -> bool:
    """serve.decode_gemv_glu on one decoder layer's MLP: when its act_fn is SiLU and gate/up are one fused product
    of ours (merged, or decode_fuse lora's [W, B]: with decode_fuse projections over the adapter, each member adds
    its own LoRA B product after the fused one, so the activation cannot be made inside it). Whether installed."""
    mlp = getattr(layer, "mlp", None)
    gate, up = (getattr(mlp, name, None) for name in ("gate_proj", "up_proj"))
    act = getattr(mlp, "act_fn", None)
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation" or act is F.silu
    if not silu or gate is None or getattr(gate, "_birbal_later", ()) != (up,):
        return False
    forward = getattr(gate.forward, "__func__", None)
    if forward is _first_lora_in_base:
        object.__setattr__(gate, "_birbal_act_product", _act_lora_in_base)
    elif forward is _first_linear:
        object.__setattr__(gate, "_birbal_act_product", _act_linear)
    else:
        return False
    mlp.forward = types.MethodType(_glu_mlp, mlp)
    return True


def _peft_model_types() -> tuple:
    try:
        from peft import PeftModel
    except ImportError:
        return ()
    return (PeftModel,)


def _fuse_group(members: list, lora_in_base: bool = False, gemv: str = "cublas",
                split_input: bool = False) -> str | None:
    """Fuse one group in place; None when done, else why not (nothing changed)."""
    for m in members:
        object.__setattr__(m, "_birbal_gemv", gemv)
        object.__setattr__(m, "_birbal_split_input", split_input)
    lora = [plain_lora_parts(m) for m in members]
    if not any(lora) and len(members) == 1:
        if gemv in ("all", "triton") and _plain(members[0]):
            members[0].forward = types.MethodType(_single_linear, members[0])
            return None
        return "one plain projection: nothing to fuse"
    if not any(lora):
        if not all(_plain(m) for m in members):
            return "not plain unquantized linear layers without a bias"
        fused, views = _fuse([m.weight for m in members])
        for m, view in zip(members, views, strict=True):
            _set_weight(m, view)
        first = members[0]
        first.register_buffer(FUSED, fused, persistent=False)
        object.__setattr__(first, "_birbal_sizes", tuple(m.weight.shape[0] for m in members))
        object.__setattr__(first, "_birbal_later", tuple(members[1:]))
        first.forward = types.MethodType(_first_linear, first)
        for m in members[1:]:
            setattr(m, HANDED, None)
            m.forward = types.MethodType(_later_linear, m)
        return None
    if not all(lora):
        return "LoRA on some projections only, or a LoRA layer with several adapters or a variant"
    if not all(_plain(parts[0]) and _plain(parts[1]) for parts in lora):
        return "a quantized base or a bias"
    dtypes = {p.dtype for parts in lora for p in (parts[0].weight, parts[1].weight)}
    if len(dtypes) != 1:
        return "LoRA weights in another dtype than the base's"
    if lora_in_base and len({m.scaling[parts[5]] for m, parts in zip(members, lora, strict=True)}) == 1:
        return _fuse_lora_in_base(members, lora)
    if len(members) == 1:
        return "one projection (decode_fuse: lora puts its B into the base)"
    fused, views = _fuse([parts[0].weight for parts in lora])
    fused_a, views_a = _fuse([parts[1].weight for parts in lora])
    for m, parts, view, view_a in zip(members, lora, views, views_a, strict=True):
        base, a, b, _dropout, _scaling, name = parts
        _set_weight(base, view)
        _set_weight(a, view_a)
        _adopt(m, name, a, b)
    object.__setattr__(members[0], "_birbal_ranks", tuple(parts[1].weight.shape[0] for parts in lora))
    _install(members, lora, fused, fused_a, _first_lora, _later_lora)
    return None


def _adopt(member, name: str, lora_a, lora_b) -> None:
    """What a fused forward reads on its LoRA member: the adapter's name, its A and B, and peft's own forward."""
    object.__setattr__(member, "_birbal_adapter", name)
    object.__setattr__(member, "_birbal_lora_a", lora_a)
    object.__setattr__(member, "_birbal_lora_b", lora_b)
    object.__setattr__(member, "_birbal_peft_forward", member.forward)  # peft's own, bound


def _install(members: list, lora: list, fused: torch.Tensor, fused_a: torch.Tensor, first_forward,
             later_forward) -> None:
    """The group's fused matrices on its first member, and the first and later members' forwards bound."""
    first = members[0]
    first.register_buffer(FUSED, fused, persistent=False)
    first.register_buffer(FUSED_A, fused_a, persistent=False)
    object.__setattr__(first, "_birbal_sizes", tuple(parts[0].weight.shape[0] for parts in lora))
    object.__setattr__(first, "_birbal_later", tuple(members[1:]))
    first.forward = types.MethodType(first_forward, first)
    for m in members[1:]:
        setattr(m, HANDED, None)
        m.forward = types.MethodType(later_forward, m)


def _fuse_lora_in_base(members: list, lora: list) -> None:
    """One matrix [[W_1, B_1, 0, ...], [W_2, 0, B_2, ...], ...] (rows: the members' outputs; columns: the input,
    then each member's rank), whose blocks are the members' base and B weights (views), and the A matrices one
    above the other (views)."""
    bases = [parts[0].weight for parts in lora]
    ranks = [parts[1].weight.shape[0] for parts in lora]
    k, total_rank = bases[0].shape[1], sum(ranks)
    rows = sum(w.shape[0] for w in bases)
    fused = torch.zeros(rows, k + total_rank, dtype=bases[0].dtype, device=bases[0].device)
    fused_a, views_a = _fuse([parts[1].weight for parts in lora])
    row, col = 0, k
    for m, parts, rank, view_a in zip(members, lora, ranks, views_a, strict=True):
        base, a, b, _dropout, _scaling, name = parts
        n = base.weight.shape[0]
        fused[row:row + n, :k] = base.weight.detach()
        fused[row:row + n, col:col + rank] = b.weight.detach()
        _set_weight(base, fused[row:row + n, :k])
        _set_weight(b, fused[row:row + n, col:col + rank])
        _set_weight(a, view_a)
        _adopt(m, name, a, b)
        row, col = row + n, col + rank
    _install(members, lora, fused, fused_a, _first_lora_in_base, _later_lora_in_base)
    return None
