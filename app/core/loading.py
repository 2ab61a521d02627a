"""The allocations of loading a model for fine-tuning, in order: the script the allocator replay starts from.

The reference stack loads as `app/measure/model_build.py` does, with transformers 5.17 `from_pretrained`
and a GPU `device_map`, then peft 0.21 (`prepare_model_for_kbit_training` for QLoRA, `get_peft_model`):

1. `caching_allocator_warmup` (modeling_utils.py) sums `get_total_byte_count` (each state-dict tensor's
   numel x element size, tied weights once, 0.5 byte per element for what bitsandbytes will quantize:
   `Bnb4BitHfQuantizer.quantized_element_size`), less the reserved-but-unused bytes already cached,
   and allocates and frees `torch.empty(byte_count // 2, dtype=float16)`: one segment of about the
   model's size that the weights are then carved out of (j-segments.txt: Qwen3-8B QLoRA 5,686 MiB,
   bf16 15,624 MiB).
2. `convert_and_load_state_dict_in_model` (core_model_loading.py) materializes the checkpoint's
   tensors in `dot_natural_key` order, each straight in its load dtype (`_materialize_copy`:
   `tensor.to(device, dtype)`, a blocking copy, so the cast happens on the CPU).  A weight that
   bitsandbytes quantizes on the fly arrives in the load dtype first; `Bnb4bitQuantize.convert` wraps it
   in a `Params4bit` whose `.to(device)` runs `functional.quantize_4bit`, and the 16-bit weight is freed
   when the converter drops it.
3. QLoRA: `prepare_model_for_kbit_training` (peft utils/other.py) casts every 16-bit parameter that is
   not a `Params4bit` to fp32 (`param.data = param.data.to(float32)`: the new tensor, then the old one
   freed), in `model.parameters()` order, then calls `torch.cuda.empty_cache()` (auto_clear_cache).
4. `get_peft_model`: LoRA `update_layer` builds A and B on the CPU and `_move_adapter_to_device_of_base_layer`
   moves them to the GPU in the base layer's dtype (a bnb `Linear4bit`: its compute dtype), module by
   module; then `cast_adapter_dtype` (tuners_utils.py, autocast_adapter_dtype=True) replaces every
   16-bit adapter weight by an fp32 copy (the 20 MiB segments of both kinds in j-segments.txt's j002).
5. FSDP2 (`fully_shard` per decoder layer, then the root): every parameter is replaced by its 1/N shard
   after the whole model was loaded (the harness's FSDP runs, `full_model_load_per_gpu`), or each rank
   only ever holds its shards (sharded loading, the engine configs tunefit hands out).

Steps 1-4 replay the harness's measured stage readings (`stages.load`, `stages.peft`: reserved bytes
after from_pretrained and after peft, and the peak between) to the MiB on most single-GPU runs
(tests/core/test_loading.py); MoE checkpoints' fused-expert conversion is left to moe_load.py.

Left out: the order in which transformers' 4 loader threads materialize unquantized tensors (taken as the
sorted order: the threads only interleave tensors of the same few sizes), non-persistent buffers (RoPE's
inv_freq), and Linear4bit's in-place cast of a bias to the compute dtype at the first forward (small
tensors, in the small pool).

A script is a flat tuple of ints: n >= 0 allocates n bytes (the k-th allocation of the script is
allocation k), -1 - k frees allocation k, and EMPTY_CACHE releases every segment with nothing allocated
in it (CUDACachingAllocator `release_cached_blocks`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from app.core import ddp, moe_lora
from app.core.architecture import Architecture, Linear
from app.core.keys import HashOnceTuple
from app.core.params import param_bytes
from app.core.quant import NF4_BLOCK, NF4_CODE_BYTES, NF4_DQ_BLOCK, QUANT_MAP_BYTES, nf4_tensors
from app.core.setup import TrainingSetup

EMPTY_CACHE = -(1 << 62)
# The harness creates the CUDA context with `torch.zeros(1, device=device)` before anything else
# (app/measure/gpu.py `start_cuda`); the 4-byte tensor is freed at once and leaves its 2 MiB small
# segment cached, which `caching_allocator_warmup` then subtracts as reserved-but-unused memory (the
# single-GPU runs' stages.load: Llama-3.2-1B 2,378 MiB = a 2,356 MiB warmup, a 20 MiB segment for the
# weights that no longer fit, the 2 MiB small segment).
CONTEXT_PROBE_BYTES = 4
SMALL_SEGMENT = 2 << 20

_ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"}
# a decoder layer's norms in registration order (Gemma 2/3 have four)
_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
          "post_feedforward_layernorm")


class Tensor(NamedTuple):
    """One parameter: checkpoint key, elements, whether bitsandbytes quantizes it, module-order rank."""

    key: str
    numel: int
    rows: int  # its first dimension (FSDP2 shards along it)
    quantized: bool
    order: tuple[int, int, int]  # (0 embed | 1 layer | 2 final norm | 3 lm_head, layer, position in it)


def dot_natural_key(key: str) -> list[tuple[int, int] | tuple[int, str] | tuple[int, str, int]]:
    """transformers core_model_loading.py `dot_natural_key`: digits numerically, names alphabetically."""
    parts: list[tuple[int, int] | tuple[int, str] | tuple[int, str, int]] = []
    for part in key.split("."):
        if part.isdigit():
            parts.append((0, int(part)))
            continue
        text = part.rstrip("0123456789")
        digits = part[len(text) :]
        parts.append((1, text, int(digits)) if digits else (1, text))
    return parts


def _shape(arch: Architecture, i: int) -> tuple[bool, ...]:
    """Which of the Linears (and the MoE block) decoder layer i has: layers alike share their tensors."""
    return (*(i < lin.layers for lin in arch.linears), arch.is_moe and i < arch.num_moe_layers)


@lru_cache(maxsize=1024)
def _layer_linears(arch: Architecture, shape: tuple[bool, ...]) -> tuple[tuple[str, Linear], ...]:
    """A decoder layer's Linears in module registration order, with their keys under the layer."""
    attn: list[tuple[str, Linear]] = []
    mlp: list[tuple[str, Linear]] = []
    # Qwen2-MoE's shared expert repeats the dense MLP's names after them (architecture.parse_config)
    first_shared = len(arch.linears) - 4 if arch.shared_expert_intermediate_size else len(arch.linears)
    for n, lin in enumerate(arch.linears):
        if not shape[n]:  # dense-only or MoE-only linears: placed in the first `layers` layers
            continue
        if lin.name in _ATTENTION:
            attn.append((f"self_attn.{lin.name}", lin))
        elif n >= first_shared and lin.name != "shared_expert_gate":
            mlp.append((f"mlp.shared_expert.{lin.name}", lin))
        else:
            mlp.append((f"mlp.{lin.name}", lin))
    return (*attn, *mlp)


@lru_cache(maxsize=1024)
def _layer_tensors(
    arch: Architecture, shape: tuple[bool, ...], quantize: bool
) -> tuple[tuple[str, int, int, bool], ...]:
    """A decoder layer's parameters in module registration order (model.parameters()): checkpoint key
    under the layer, elements, rows, quantized."""
    h = arch.hidden_size
    out: list[tuple[str, int, int, bool]] = []
    mlp: list[tuple[str, int, int, bool]] = []
    for key, lin in _layer_linears(arch, shape):
        dest = out if key.startswith("self_attn.") else mlp
        dest.append((f"{key}.weight", lin.weight_numel, lin.out_features, quantize))
        if lin.bias:
            dest.append((f"{key}.bias", lin.out_features, lin.out_features, False))
    if arch.qk_norm:
        d = arch.head_dim
        out += [("self_attn.q_norm.weight", d, d, False), ("self_attn.k_norm.weight", d, d, False)]
    if shape[-1]:
        e, mi = arch.num_experts, arch.moe_intermediate_size
        gate_up, down, router = e * 2 * mi * h, e * h * mi, e * h
        if arch.family == "mixtral":
            # MixtralSparseMoeBlock registers gate (router) before experts; the checkpoint's per-expert
            # w1 (gate) / w2 (down) / w3 (up) sources sort under block_sparse_moe (conversion_mapping.py)
            experts = [("block_sparse_moe.gate.weight", router, e, False),
                       ("block_sparse_moe.experts.0.w1.weight", gate_up, e, False),
                       ("block_sparse_moe.experts.0.w2.weight", down, e, False)]
        else:  # qwen2_moe-style: experts (gate_up_proj, down_proj) registered before the gate
            experts = [("mlp.experts.0.gate_proj.weight", gate_up, e, False),
                       ("mlp.experts.0.down_proj.weight", down, e, False),
                       ("mlp.gate.weight", router, e, False)]
        mlp = experts + mlp
    out += mlp
    out += [(f"{n}.weight", h, h, False) for n in _NORMS[: arch.norms_per_layer]]
    return tuple(out)


@lru_cache(maxsize=1024)
def _checkpoint_order(
    arch: Architecture, shape: tuple[bool, ...], quantize: bool
) -> tuple[tuple[int, int, bool], ...]:
    """A layer's tensors in `dot_natural_key` order: (position in model order, elements, quantized)."""
    rel = [(k, pos, n, q) for pos, (k, n, _, q) in enumerate(_layer_tensors(arch, shape, quantize))]
    return tuple((pos, n, q) for _, pos, n, q in sorted(rel, key=lambda x: dot_natural_key(x[0])))


@lru_cache(maxsize=256)
def model_tensors(arch: Architecture, quantize: bool) -> tuple[Tensor, ...]:
    """Every parameter tensor (tied lm_head left out), in model.parameters() order."""
    h, v = arch.hidden_size, arch.vocab_size
    tensors = [Tensor("model.embed_tokens.weight", v * h, v, False, (0, 0, 0))]
    for i in range(arch.num_layers):
        for pos, (key, numel, rows, q) in enumerate(_layer_tensors(arch, _shape(arch, i), quantize)):
            tensors.append(Tensor(f"model.layers.{i}.{key}", numel, rows, q, (1, i, pos)))
    tensors.append(Tensor("model.norm.weight", h, h, False, (2, 0, 0)))
    if not arch.tie_embeddings:
        # transformers `replace_with_bnb_linear` leaves the lm_head unquantized (get_keys_to_not_convert)
        tensors.append(Tensor("lm_head.weight", v * h, v, False, (3, 0, 0)))
    return tuple(tensors)


@lru_cache(maxsize=256)
def _layout(arch: Architecture) -> tuple[tuple[tuple[bool, ...], ...], tuple[int, ...]]:
    """Each layer's shape and the index of its first tensor in `model_tensors` (the embedding is 0)."""
    shapes = tuple(_shape(arch, i) for i in range(arch.num_layers))
    starts: list[int] = []
    at = 1
    for shape in shapes:
        starts.append(at)
        at += len(_layer_tensors(arch, shape, False))
    return shapes, tuple(starts)


class Script(HashOnceTuple[int]):
    """A load script; its hash (the replay's loaded-state caches key on it) is computed once."""


class _Script:
    __slots__ = ("count", "ops")

    def __init__(self) -> None:
        self.ops: list[int] = []
        self.count = 0

    def alloc(self, nbytes: int) -> int:
        self.ops.append(nbytes)
        self.count += 1
        return self.count - 1

    def free(self, k: int) -> None:
        self.ops.append(-1 - k)

    def append(self, ops: list[int], count: int) -> int:
        """Append another script's ops (its allocations renumbered after ours); their first number."""
        base = self.count
        self.ops.extend(op if op >= 0 else op - base for op in ops)  # free -1-k becomes -1-(base+k)
        self.count += count
        return base


def _quantize_4bit(s: _Script, numel: int, double_quant: bool, first: bool) -> None:
    """bitsandbytes 0.50.2 `functional.quantize_4bit` (blocksize 64, nf4, uint8 storage) on the GPU."""
    blocks = -(-numel // NF4_BLOCK)
    absmax = s.alloc(blocks * 4)  # backends/cuda/ops.py quantize_4bit: fp32 absmax, then the packed out
    s.alloc(-(-numel // 2))
    # get_4bit_type: the nf4 code table on the device, `data.div_(data.abs().max())`
    s.alloc(NF4_CODE_BYTES)
    tmp_abs, tmp_max = s.alloc(NF4_CODE_BYTES), s.alloc(4)
    s.free(tmp_abs)
    s.free(tmp_max)
    if double_quant:
        s.alloc(4)  # offset = absmax.mean()
        centred = s.alloc(blocks * 4)  # absmax - offset
        if first:  # quantize_blockwise caches name2qmap["dynamic"] on the device at its first call
            s.alloc(QUANT_MAP_BYTES)
        # backends/cuda/ops.py quantize_blockwise (blocksize 256): fp32 absmax, uint8 codes; then the
        # nested QuantState's own copy of the map
        s.alloc(-(-blocks // NF4_DQ_BLOCK) * 4)
        s.alloc(blocks)
        s.alloc(QUANT_MAP_BYTES)
        s.free(centred)
        s.free(absmax)  # `del _absmax`


def _materialize_plain(
    s: _Script, items: list[tuple[int, int, bool]], elem: int, double_quant: bool, first: bool
) -> tuple[list[tuple[int, int]], bool]:
    """Load (index, elements, quantized) tensors in the given order: (index, allocation) of those that
    stay, and whether bitsandbytes still has its first quantization ahead."""
    live: list[tuple[int, int]] = []
    for idx, numel, quantized in items:
        if quantized:
            raw = s.alloc(numel * elem)
            _quantize_4bit(s, numel, double_quant, first)
            first = False
            s.free(raw)
        else:
            live.append((idx, s.alloc(numel * elem)))
    return live, first


def _convert_experts(
    s: _Script, fused: list[tuple[int, int, int]], experts: int, elem: int
) -> list[tuple[int, int]]:
    """transformers 5's weight converter on one MoE layer's per-expert checkpoint tensors.

    `fused`: (index, elements, halves) of the layer's fused expert tensors in checkpoint order. The
    loader's threads materialize every per-expert source (natural key order: expert by expert); then
    each source list is stacked (MergeModulelist, a new tensor) and freed, and gate_up's two stacks are
    concatenated (Concatenate) and freed.  Allocation trace c-large-008 (profiles/trace-*.jsonl.gz):
    3 x 128 sources of 3 MiB, three 384 MiB stacks, one 768 MiB concatenation per Qwen3-MoE layer.
    """
    parts = [(idx, numel * elem // halves // experts) for idx, numel, halves in fused for _ in range(halves)]
    sources = [[0] * experts for _ in parts]
    for e in range(experts):
        for p, (_, nbytes) in enumerate(parts):
            sources[p][e] = s.alloc(nbytes)
    stacks: dict[int, list[int]] = {}
    for p, (idx, nbytes) in enumerate(parts):
        stacks.setdefault(idx, []).append(s.alloc(nbytes * experts))
        for k in sources[p]:
            s.free(k)
    live: list[tuple[int, int]] = []
    for idx, numel, halves in fused:
        if halves == 1:
            live.append((idx, stacks[idx][0]))
            continue
        live.append((idx, s.alloc(numel * elem)))
        for k in stacks[idx]:
            s.free(k)
    return live


def _materialize_layer(
    s: _Script, arch: Architecture, shape: tuple[bool, ...], quantize: bool, elem: int, dq: bool, first: bool
) -> tuple[list[tuple[int, int]], bool]:
    """One decoder layer's tensors in checkpoint order, its fused MoE experts converted on the way."""
    order = list(_checkpoint_order(arch, shape, quantize))
    halves = _expert_halves(arch, shape, quantize)
    live: list[tuple[int, int]] = []
    plain: list[tuple[int, int, bool]] = []
    fused = [(idx, numel, halves[idx]) for idx, numel, _ in order if idx in halves]
    for item in order:
        if item[0] not in halves:
            plain.append(item)
        elif item[0] == fused[0][0]:  # the layer's first expert key: the converter's work happens here
            done, first = _materialize_plain(s, plain, elem, dq, first)
            live += done
            plain = []
            live += _convert_experts(s, fused, arch.num_experts, elem)
    done, first = _materialize_plain(s, plain, elem, dq, first)
    return live + done, first


@lru_cache(maxsize=256)
def _expert_halves(arch: Architecture, shape: tuple[bool, ...], quantize: bool) -> dict[int, int]:
    """Position -> how many per-expert source lists make it, for a layer's fused expert tensors."""
    out: dict[int, int] = {}
    for pos, (key, _, _, _) in enumerate(_layer_tensors(arch, shape, quantize)):
        if ".experts.0." in key:
            out[pos] = 2 if key.split(".")[-2] in ("gate_proj", "w1") else 1
    return out


def _materialize(
    s: _Script, arch: Architecture, tensors: tuple[Tensor, ...], elem: int, double_quant: bool
) -> list[int]:
    """Every tensor in `dot_natural_key` order: lm_head and model.embed_tokens sort before
    model.layers.<i> (numeric order), model.norm after.  A layer's own keys sort alike in every layer
    of its shape, so its allocations are built once and repeated with shifted numbers.  Returns each
    tensor's live allocation (-1: none, a quantized weight's 16-bit original)."""
    live = [-1] * len(tensors)
    quantize = any(t.quantized for t in tensors)
    shapes, starts = _layout(arch)
    norm = starts[-1] + len(_layer_tensors(arch, shapes[-1], quantize)) if shapes else 1
    head = [(len(tensors) - 1, tensors[-1].numel, False)] if len(tensors) > norm + 1 else []
    done, first = _materialize_plain(s, [*head, (0, tensors[0].numel, False)], elem, double_quant, True)
    templates: dict[tuple[tuple[bool, ...], bool], tuple[list[int], int, list[tuple[int, int]], bool]] = {}
    for shape, start in zip(shapes, starts, strict=True):
        tpl = templates.get((shape, first))
        if tpl is None:
            sub = _Script()
            sub_live, now_first = _materialize_layer(sub, arch, shape, quantize, elem, double_quant, first)
            tpl = templates[(shape, first)] = (sub.ops, sub.count, sub_live, now_first)
        ops, count, sub_live, first = tpl
        base = s.append(ops, count)
        done.extend((start + pos, base + k) for pos, k in sub_live)
    done += _materialize_plain(s, [(norm, arch.hidden_size, False)], elem, double_quant, first)[0]
    for idx, k in done:
        live[idx] = k
    return live


def warmup_bytes(tensors: tuple[Tensor, ...], elem: int, unused: int) -> int:
    """Bytes of `caching_allocator_warmup`'s `torch.empty(byte_count // 2, dtype=float16)`."""
    # get_total_byte_count in half-bytes (a quantized element counts 0.5 byte)
    halves = sum(t.numel * (1 if t.quantized else 2 * elem) for t in tensors)
    if halves - 2 * unused > 2 * unused:  # `byte_count - unused_memory > unused_memory`
        halves -= 2 * unused
    else:  # the other branches need unused memory beyond 1.5 GiB, which nothing here caches
        return 0
    # The cap `min(byte_count, total_device_memory - 1.2 GiB)` only binds when the weights alone
    # exceed the card; the replay is GPU-independent and such a model does not fit anyway.
    return 2 * (halves // 4)


def _key(
    setup: TrainingSetup, targets: frozenset[str]
) -> tuple[str, str, bool, frozenset[str], int, int, bool, bool]:
    full = setup.method == "full"
    shards = setup.num_gpus if setup.parallelism == "fsdp" else 1
    ddp = setup.num_gpus > 1 and setup.parallelism == "ddp"
    return (setup.method, setup.precision, setup.double_quant, frozenset() if full else targets,
            0 if full else setup.lora_rank, shards, shards == 1 or setup.full_model_load_per_gpu, ddp)


def load_stages(
    arch: Architecture, setup: TrainingSetup, targets: frozenset[str]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The allocations and frees from CUDA init to the first training step, loading as model_build.py
    does (see the module docstring), in the harness's stages: from_pretrained, peft (kbit preparation
    and adapters), FSDP2 sharding.  Batch-independent, cached per model and method."""
    return _stages(arch, *_key(setup, targets))


def load_script(arch: Architecture, setup: TrainingSetup, targets: frozenset[str]) -> tuple[int, ...]:
    """`load_stages` as one script, the key of the replay's cached loaded state."""
    return _script(arch, *_key(setup, targets))


@lru_cache(maxsize=64)
def _script(
    arch: Architecture,
    method: str,
    precision: str,
    double_quant: bool,
    targets: frozenset[str],
    rank: int,
    shards: int,
    full_load: bool,
    ddp: bool,
) -> tuple[int, ...]:
    loaded, peft, shard = _stages(
        arch, method, precision, double_quant, targets, rank, shards, full_load, ddp
    )
    return Script(loaded + peft + shard)


@lru_cache(maxsize=64)
def _stages(
    arch: Architecture,
    method: str,
    precision: str,
    double_quant: bool,
    targets: frozenset[str],
    rank: int,
    shards: int,
    full_load: bool,
    ddp: bool = False,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    ops, count, live, lora = _single(arch, method, precision, double_quant, targets, rank)
    if ddp:
        s = _Script()
        s.count = count
        wrap = _ddp_wrap(arch, method, precision, lora)
        s.append(wrap, sum(op >= 0 for op in wrap))
        return ops[0], ops[1], tuple(s.ops)
    if shards == 1:
        return ops
    quantize = method == "qlora"
    tensors = model_tensors(arch, quantize)
    elem = 4 if quantize else _load_elem(method, precision)
    s = _Script()
    if full_load:
        # every rank from_pretrained's the whole model onto its GPU, then fully_shard swaps it for shards
        s.count = count
        _fully_shard(s, arch, tensors, live, lora, elem, shards)
        return ops[0], ops[1], tuple(s.ops)
    # Sharded loading (accelerate's fsdp_cpu_ram_efficient_loading, the engine configs tunefit hands
    # out): the model is built off the GPU and each rank only ever holds its shards (the packed 4-bit
    # weights of QLoRA whole, as the full load leaves them); the broadcast's one-tensor buffers are left out.
    s.free(s.alloc(CONTEXT_PROBE_BYTES))
    nf4 = [n for t in tensors if t.quantized for n in nf4_tensors(t.numel, double_quant)]
    stub = _Script()
    for n in nf4:
        stub.alloc(n)
    s.append(stub.ops, stub.count)
    ghost = _Script()  # shards only: the "full" tensors _fully_shard frees are never there
    ghost.count = count
    _fully_shard(ghost, arch, tensors, live, lora, elem, shards)
    shard_allocs = [op for op in ghost.ops if op >= 0]
    s.append(shard_allocs, len(shard_allocs))
    return tuple(s.ops), (), ()


def _ddp_wrap(
    arch: Architecture, method: str, precision: str, lora: dict[int, tuple[tuple[int, int, int, int], ...]]
) -> list[int]:
    """DistributedDataParallel's module-state broadcast over the loaded model (ddp.py)."""
    return ddp.broadcast_ops(ddp_params(arch, method, precision, lora)[0])


def ddp_params(
    arch: Architecture, method: str, precision: str, lora: dict[int, tuple[tuple[int, int, int, int], ...]]
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(every parameter, the trainable ones) in model.parameters() order as (bytes, element size), each
    LoRA adapter after its base weight."""
    quantize = method == "qlora"
    elem = _load_elem(method, precision)
    states: list[tuple[int, int]] = []
    trainable: list[tuple[int, int]] = []
    for idx, t in enumerate(model_tensors(arch, quantize)):
        if t.quantized:  # a Params4bit: its packed uint8 data (the quant state is no parameter)
            states.append((-(-t.numel // 2), 1))
        else:  # prepare_model_for_kbit_training made the others fp32
            size = 4 if quantize else elem
            states.append((t.numel * size, size))
            if method == "full":
                trainable.append(states[-1])
        for rows, cols, _handle, size in lora.get(idx, ()):
            states.append((rows * cols * size, size))
            trainable.append(states[-1])
    return states, trainable


def ddp_buckets(
    arch: Architecture, setup: TrainingSetup, targets: frozenset[str]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The Reducer's first and rebuilt buckets for this setup under DDP (ddp.buckets)."""
    return _ddp_buckets(arch, *_key(setup, targets)[:5])


@lru_cache(maxsize=64)
def _ddp_buckets(
    arch: Architecture, method: str, precision: str, dq: bool, targets: frozenset[str], rank: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """ddp_buckets per model and method: build_plan asks on every DDP estimate."""
    lora = _single(arch, method, precision, dq, targets, rank)[3]
    return ddp.buckets(ddp_params(arch, method, precision, lora)[1])


def _load_elem(method: str, precision: str) -> int:
    """Bytes per element of the from_pretrained dtype (model_build.py DTYPES; QLoRA's bf16/fp16 runs
    load in their compute dtype)."""
    return param_bytes(TrainingSetup(method, precision=precision))  # type: ignore[arg-type]


@lru_cache(maxsize=64)
def _single(
    arch: Architecture, method: str, precision: str, double_quant: bool, targets: frozenset[str], rank: int
) -> tuple[
    tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], int, tuple[int, ...],
    dict[int, tuple[tuple[int, int, int, int], ...]],
]:
    """The stages on one GPU; the allocation count, each tensor's live allocation and the adapters'
    (rows, cols, allocation, bytes per element) by their base weight's index, for FSDP's sharding."""
    elem = _load_elem(method, precision)
    # adapters arrive in the base layer's dtype: its weights' (LoRA) or bnb's compute dtype (QLoRA)
    adapter_elem = 2 if method == "qlora" else elem
    s = _Script()
    s.free(s.alloc(CONTEXT_PROBE_BYTES))
    quantize = method == "qlora"
    tensors = model_tensors(arch, quantize)
    warm = warmup_bytes(tensors, elem, SMALL_SEGMENT)
    if warm:
        s.free(s.alloc(warm))
    live = _materialize(s, arch, tensors, elem, double_quant)
    loaded = len(s.ops)
    if quantize:
        for idx, t in enumerate(tensors):
            if not t.quantized and elem == 2:
                old = live[idx]
                live[idx] = s.alloc(t.numel * 4)
                s.free(old)
        s.ops.append(EMPTY_CACHE)
    lora: dict[int, tuple[tuple[int, int, int, int], ...]] = {}
    if method != "full":
        shapes, starts = _layout(arch)
        wrapped = [(start + pos, i, o) for shape, start in zip(shapes, starts, strict=True)
                   for pos, i, o in _wrapped(arch, shape, targets)]
        made = [(s.alloc(rank * i * adapter_elem), s.alloc(o * rank * adapter_elem)) for _, i, o in wrapped]
        if adapter_elem == 2:
            final = []
            for (ha, hb), (_, i, o) in zip(made, wrapped, strict=True):
                a32 = s.alloc(rank * i * 4)
                s.free(ha)
                b32 = s.alloc(o * rank * 4)
                s.free(hb)
                final.append((a32, b32))
            made = final
        size = 4 if adapter_elem == 2 else adapter_elem
        for (ha, hb), (idx, i, o) in zip(made, wrapped, strict=True):
            lora[idx] = ((rank, i, ha, size), (o, rank, hb, size))
        _expert_adapters(s, arch, targets, rank, 4 if quantize else elem)
    ops = tuple(s.ops)
    return (ops[:loaded], ops[loaded:], ()), s.count, tuple(live), lora


def _expert_adapters(s: _Script, arch: Architecture, targets: frozenset[str], rank: int, elem: int) -> None:
    """peft's ParamWrappers on MoE parameters (moe_lora), injected after every module target: A and B
    in the parameter's dtype (fp32 experts under QLoRA), 16-bit ones then replaced by fp32 copies."""
    wrapped = moe_lora.expert_params(arch, targets, rank)
    if not wrapped:
        return
    sizes = [n for p in wrapped for n in (p.a[0] * p.a[1], p.b[0] * p.b[1])] * arch.num_moe_layers
    made = [s.alloc(n * elem) for n in sizes]
    if elem == 2:
        for h, n in zip(made, sizes, strict=True):
            s.alloc(n * 4)
            s.free(h)


@lru_cache(maxsize=1024)
def _wrapped(
    arch: Architecture, shape: tuple[bool, ...], targets: frozenset[str]
) -> tuple[tuple[int, int, int], ...]:
    """(position in model order, in, out) of a layer's Linears LoRA wraps, in module order (peft's
    inject_adapter walks named_modules)."""
    pos = {key: n for n, (key, _, _, _) in enumerate(_layer_tensors(arch, shape, False))}
    return tuple((pos[f"{key}.weight"], lin.in_features, lin.out_features)
                 for key, lin in _layer_linears(arch, shape) if lin.name in targets)


def _fully_shard(
    s: _Script,
    arch: Architecture,
    tensors: tuple[Tensor, ...],
    live: tuple[int, ...],
    lora: dict[int, tuple[tuple[int, int, int, int], ...]],
    elem: int,
    shards: int,
) -> None:
    """FSDP2 `fully_shard` per decoder layer, then on the root (embedding, final norm, lm_head): each
    parameter gets a zero-padded shard of ceil(rows / N) rows (`FSDPParam._init_sharded_param`,
    `param_data.new_zeros(padded_sharded_size)`), and the unit's full parameters are freed when
    `fully_shard` returns and drops its `params` list."""
    shapes, starts = _layout(arch)
    units = [range(start, start + len(_layer_tensors(arch, shape, False)))
             for shape, start in zip(shapes, starts, strict=True)]
    root = [0, *range(units[-1].stop if units else 1, len(tensors))]
    for unit in [*units, root]:
        params: list[tuple[int, int, int, int]] = []
        for idx in unit:
            t = tensors[idx]
            if live[idx] < 0:  # bnb's packed 4-bit weights are left out
                continue
            params.append((t.rows, t.numel // t.rows, live[idx], elem))
            # a LoRA layer registers base_layer (weight, bias) before lora_A and lora_B
            base = idx - 1 if t.key.endswith(".bias") else idx
            has_bias = idx + 1 < len(tensors) and tensors[idx + 1].key.endswith(".bias")
            if base in lora and (base != idx or not has_bias):
                params.extend(lora[base])
        for rows, cols, _, size in params:
            s.alloc(-(-rows // shards) * cols * size)
        for _, _, full, _ in params:
            s.free(full)
