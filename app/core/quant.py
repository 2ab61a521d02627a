"""bitsandbytes storage sizes: NF4 weights (QLoRA) and 8-bit optimizer states."""

from __future__ import annotations

# bitsandbytes 0.50.2 `functional.quantize_4bit`: blocksize defaults to 64; the packed weight is
# uint8 with two 4-bit codes per byte; absmax is one fp32 per block.  With compress_statistics
# (double quant) absmax becomes uint8 from `quantize_blockwise(absmax - offset, blocksize=256)`,
# which adds one fp32 absmax per 256 blocks and an fp32 offset scalar.
NF4_BLOCK = 64
NF4_DQ_BLOCK = 256
# `get_4bit_type('nf4')` builds a fresh 16-entry fp32 code tensor per quantized weight.
NF4_CODE_BYTES = 16 * 4
# Double quant's `quantize_blockwise(..., nested=False)` keeps `code.to(A.device, copy=True)`, a copy of the
# 256-entry fp32 dynamic map (`create_dynamic_map`), in every weight's nested QuantState.
QUANT_MAP_BYTES = 256 * 4

# bitsandbytes 0.50.2 `optim/optimizer.py` Optimizer8bit: states are uint8 with one fp32 absmax per
# 256-element block (`blocksize=256` in the blockwise update), and tensors with fewer than
# `min_8bit_size=4096` elements keep fp32 states.
BNB_8BIT_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096


def nf4_tensors(numel: int, double_quant: bool) -> tuple[int, ...]:
    """Byte sizes of the separate CUDA tensors bitsandbytes keeps for one NF4-quantized weight."""
    blocks = -(-numel // NF4_BLOCK)
    packed = -(-numel // 2)
    if not double_quant:
        return (packed, blocks * 4, NF4_CODE_BYTES)
    blocks2 = -(-blocks // NF4_DQ_BLOCK)
    # packed codes, uint8 absmax, fp32 absmax of absmax, fp32 offset, nf4 code table, dynamic map copy
    return (packed, blocks, blocks2 * 4, 4, NF4_CODE_BYTES, QUANT_MAP_BYTES)


def bnb8_state_tensors(numel: int) -> tuple[int, ...]:
    """Byte sizes of the state tensors bitsandbytes 8-bit Adam keeps for one parameter."""
    if numel < BNB_MIN_8BIT_SIZE:
        return (numel * 4, numel * 4)
    blocks = -(-numel // BNB_8BIT_BLOCK)
    return (numel, numel, blocks * 4, blocks * 4)
