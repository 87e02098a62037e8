"""Triton rotary position embedding, q and k in one launch, forward and backward.

The backward is the forward with ``CONJUGATE`` (rotation by the negative angle).

Grid: (tokens, batch, q head blocks + k head blocks). A program rotates ``BLOCK_H``
heads of one token, so the token's cos/sin row is loaded once and reused across heads;
program ids past the q blocks select k (one launch for both, same dtype required).

Layout: q and k are (B, S, H, D) views with any strides and a contiguous last dim
(packed (T, H, D) inputs arrive as (1, T, H, D)); so HF's (B, H, S, D) passes as
``transpose(1, 2)`` and slices of a fused qkv tensor pass without copies. Offsets are
int64. The first ``rotary_dim = 2 * cos.shape[-1]`` features rotate, in the
"rotate-half" (NeoX, InternLM) or interleaved (GPT-J) layout; the rest pass through.

Positions: ``position_ids[b, s]``, else the token's index in its sequence plus the
sequence's offset. For packed inputs the sequence of token t is found by counting the
``cu_seqlens`` entries <= t, which reads lengths on the device (no host sync, safe under
CUDA graphs). Tokens past ``cu_seqlens[-1]`` pass through unchanged; positions outside
the cos/sin table produce NaN instead of an out-of-bounds read.
"""

from __future__ import annotations

import triton
import triton.language as tl

from internlm_kernels.triton._host import MAX_GRID_YZ, batch_slices, cdiv, next_power_of_2, on_the_tensors_device

# Elements (heads x rotary pairs) one program rotates: enough 16-byte vectors per thread
# to hide latency without splitting a token's heads over too many programs.
TARGET_PAIRS_PER_PROGRAM = 2048
SEQUENCE_SEARCH_BLOCK = 256


def rotary_block_config(heads_q: int, heads_k: int, rotary_dim: int, head_dim: int):
    """(BLOCK_H, BLOCK_R, BLOCK_REST, num_warps): the one block-size heuristic for rotary."""
    block_r = next_power_of_2(max(rotary_dim // 2, 1))
    heads = min(h for h in (heads_q, heads_k) if h > 0) if heads_k > 0 else heads_q
    block_h = max(1, min(next_power_of_2(max(heads, 1)), TARGET_PAIRS_PER_PROGRAM // block_r))
    block_rest = next_power_of_2(max(head_dim - rotary_dim, 1))
    pairs = block_h * block_r
    num_warps = 1 if pairs <= 256 else 2 if pairs <= 512 else 4
    return block_h, block_r, block_rest, num_warps


@triton.jit
def _rotated_member(x, partner, cos, sin, sign):
    """One member of a rotated pair, (a, b) -> (a cos - b sin, b cos + a sin): x cos + sign
    partner sin, with sign -1 for a (partner b) and +1 for b (partner a); in fp32, the caller
    rounds once."""
    return x * cos + sign * partner * sin


@triton.jit
def _rotary_kernel(
    # q and k: input and output (B, S, H, D) views
    Q, stride_q_b, stride_q_s, stride_q_h,
    Q_OUT, stride_qo_b, stride_qo_s, stride_qo_h,
    K, stride_k_b, stride_k_s, stride_k_h,
    K_OUT, stride_ko_b, stride_ko_s, stride_ko_h,
    # tables (table_len, rotary_dim / 2)
    COS, stride_cos, SIN, stride_sin, table_len,
    # positions
    POSITION_IDS, stride_pos_b, stride_pos_s,
    SEQLEN_OFFSETS, seqlen_offset,
    CU_SEQLENS, num_sequences,
    # sizes
    heads_q, heads_k, head_dim, rotary_half, q_head_blocks,
    # features and tiles
    HAS_POSITION_IDS: tl.constexpr, HAS_OFFSETS_TENSOR: tl.constexpr, IS_VARLEN: tl.constexpr,
    INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, COPY_REST: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_REST: tl.constexpr, BLOCK_SEQS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(1).to(tl.int64)
    head_block = tl.program_id(2)

    # --- which tensor: q for the first q_head_blocks programs, k after (one launch for both)
    is_q = head_block < q_head_blocks
    X = tl.where(is_q, Q, K)
    OUT = tl.where(is_q, Q_OUT, K_OUT)
    stride_x_b = tl.where(is_q, stride_q_b, stride_k_b).to(tl.int64)
    stride_x_s = tl.where(is_q, stride_q_s, stride_k_s).to(tl.int64)
    stride_x_h = tl.where(is_q, stride_q_h, stride_k_h).to(tl.int64)
    stride_o_b = tl.where(is_q, stride_qo_b, stride_ko_b).to(tl.int64)
    stride_o_s = tl.where(is_q, stride_qo_s, stride_ko_s).to(tl.int64)
    stride_o_h = tl.where(is_q, stride_qo_h, stride_ko_h).to(tl.int64)
    heads = tl.where(is_q, heads_q, heads_k)
    first_head = tl.where(is_q, head_block, head_block - q_head_blocks) * BLOCK_H

    # --- the token's position
    local_index = token
    sequence = batch
    if IS_VARLEN:
        # Sequence of this token = number of sequence ends (cu_seqlens[1:]) at or before it.
        sequence = token * 0
        for start in range(0, num_sequences, BLOCK_SEQS):
            idx = start + 1 + tl.arange(0, BLOCK_SEQS)
            ends = tl.load(CU_SEQLENS + idx, mask=idx <= num_sequences, other=2147483647)
            sequence += tl.sum((ends <= token).to(tl.int64), axis=0)
        in_sequence = sequence < num_sequences
        sequence = tl.maximum(tl.minimum(sequence, num_sequences - 1), 0)
        local_index = token - tl.load(CU_SEQLENS + sequence).to(tl.int64)
    if HAS_POSITION_IDS:
        position = tl.load(POSITION_IDS + batch * stride_pos_b + token * stride_pos_s).to(tl.int64)
    else:
        position = local_index + seqlen_offset
        if HAS_OFFSETS_TENSOR:
            position += tl.load(SEQLEN_OFFSETS + sequence, mask=sequence < num_sequences, other=0).to(tl.int64)

    # --- cos / sin of this position: NaN outside the table, identity for padding tokens
    pairs = tl.arange(0, BLOCK_R)
    pair_ok = pairs < rotary_half
    in_table = (position >= 0) & (position < table_len)
    cos = tl.load(COS + position * stride_cos + pairs, mask=pair_ok & in_table, other=float("nan")).to(tl.float32)
    sin = tl.load(SIN + position * stride_sin + pairs, mask=pair_ok & in_table, other=float("nan")).to(tl.float32)
    if CONJUGATE:
        sin = -sin

    # --- rotate BLOCK_H heads: pairs (i, i + half) or (2i, 2i + 1)
    heads_idx = first_head + tl.arange(0, BLOCK_H)
    head_ok = heads_idx < heads
    x_base = X + batch * stride_x_b + token * stride_x_s + heads_idx.to(tl.int64)[:, None] * stride_x_h
    o_base = OUT + batch * stride_o_b + token * stride_o_s + heads_idx.to(tl.int64)[:, None] * stride_o_h
    if INTERLEAVED:
        first = 2 * pairs
        second = first + 1
    else:
        first = pairs
        second = pairs + rotary_half
    mask = head_ok[:, None] & pair_ok[None, :]
    x1 = tl.load(x_base + first[None, :], mask=mask, other=0.0)
    x2 = tl.load(x_base + second[None, :], mask=mask, other=0.0)
    out_dtype = OUT.dtype.element_ty
    o1 = _rotated_member(x1.to(tl.float32), x2.to(tl.float32), cos[None, :], sin[None, :], -1.0).to(out_dtype)
    o2 = _rotated_member(x2.to(tl.float32), x1.to(tl.float32), cos[None, :], sin[None, :], 1.0).to(out_dtype)
    if IS_VARLEN:  # padding tokens pass through bit for bit
        o1 = tl.where(in_sequence, o1, x1)
        o2 = tl.where(in_sequence, o2, x2)
    tl.store(o_base + first[None, :], o1, mask=mask)
    tl.store(o_base + second[None, :], o2, mask=mask)

    if COPY_REST:  # out of place with partial rotary: features past rotary_dim pass through
        rest = 2 * rotary_half + tl.arange(0, BLOCK_REST)
        rest_mask = head_ok[:, None] & (rest < head_dim)[None, :]
        tl.store(o_base + rest[None, :], tl.load(x_base + rest[None, :], mask=rest_mask), mask=rest_mask)


@on_the_tensors_device
def rotary(q, k, q_out, k_out, cos, sin, position_ids, seqlen_offsets, seqlen_offset: int, cu_seqlens,
           interleaved: bool, conjugate: bool, inplace: bool) -> None:
    """Launch the rotary kernel.

    q, k, q_out, k_out: (B, S, H, D) views (k may have 0 heads); with inplace, q_out / k_out
    are q / k. cos, sin: (table_len, rotary_dim / 2). position_ids: (B, S) view or None.
    seqlen_offsets: (B,) tensor or None, added to the int seqlen_offset. cu_seqlens: (B+1,)
    int32 for packed inputs (then q is (1, T, H, D)) or None.
    """
    batch, seqlen, heads_q, head_dim = q.shape
    if cu_seqlens is None and batch > MAX_GRID_YZ:  # the grid's batch axis: a launch per slice
        for rows in batch_slices(batch):
            rotary(q[rows], k[rows], q_out[rows], k_out[rows], cos, sin,
                   None if position_ids is None else position_ids[rows],
                   None if seqlen_offsets is None else seqlen_offsets[rows], seqlen_offset, None,
                   interleaved, conjugate, inplace)
        return
    heads_k = k.shape[2]
    rotary_dim = 2 * cos.shape[1]
    block_h, block_r, block_rest, num_warps = rotary_block_config(heads_q, heads_k, rotary_dim, head_dim)
    q_head_blocks = cdiv(heads_q, block_h)
    k_head_blocks = cdiv(heads_k, block_h)
    copy_rest = rotary_dim < head_dim and not inplace
    if heads_k == 0:  # no k: never read, but pass a real pointer (an empty tensor's may be null)
        k, k_out = q, q_out
    pos = position_ids if position_ids is not None else cos
    offsets = seqlen_offsets if seqlen_offsets is not None else cos
    cu = cu_seqlens if cu_seqlens is not None else cos
    num_sequences = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else batch
    grid = (seqlen, batch, q_head_blocks + k_head_blocks)
    _rotary_kernel[grid](
        q, q.stride(0), q.stride(1), q.stride(2),
        q_out, q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k, k.stride(0), k.stride(1), k.stride(2),
        k_out, k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos, cos.stride(0), sin, sin.stride(0), cos.shape[0],
        pos, pos.stride(0) if position_ids is not None else 0, pos.stride(1) if position_ids is not None else 0,
        offsets, seqlen_offset,
        cu, num_sequences,
        heads_q, heads_k, head_dim, rotary_dim // 2, q_head_blocks,
        HAS_POSITION_IDS=position_ids is not None, HAS_OFFSETS_TENSOR=seqlen_offsets is not None,
        IS_VARLEN=cu_seqlens is not None, INTERLEAVED=interleaved, CONJUGATE=conjugate, COPY_REST=copy_rest,
        BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_REST=block_rest, BLOCK_SEQS=SEQUENCE_SEARCH_BLOCK,
        num_warps=num_warps,
    )
