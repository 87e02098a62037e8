"""Triton fused attention: FlashAttention-2-style forward and backward, GQA, causal, sliding
window, packed varlen, and split-KV decoding over a KV cache.

Tiling of queries ("packed rows"). A program owns one KV head and a tile of BLOCK_M rows of
its query group: row r is query position r // GROUP of query head kv_head * GROUP + r % GROUP.
Each K/V tile is therefore loaded once for the whole group (no repeat in memory), and a
decode step (one position, GROUP heads) still fills the tile's rows.

Masks are bottom-right aligned: a query at position i of a sequence with Sq queries and Sk
keys sees key j when ``j <= i + (Sk - Sq) + right`` (right = 0 when causal) and
``j >= i + (Sk - Sq) - left`` (each side only when bounded). Key blocks every row of a tile
fully sees skip the mask (``MASK`` constexpr), as in the Triton tutorial.

Packed varlen: tiles of all sequences are numbered consecutively; a program finds its
sequence by scanning cu_seqlens on the device (tiles of sequence b: cdiv(len_b * rows per
position, BLOCK)). The grid is sized from the packed length alone (sum of tiles <= T/BLOCK + B),
so no host sync and no max_seqlen are needed, and CUDA graphs replay with new lengths.

Backward: one kernel for dK/dV (per key tile, looping over the group's query rows, so dK/dV
are summed over the group) and one for dQ (per query tile); no atomics, so every run gives
the same bits. Softmax is computed in base 2 with the scale folded into one multiply.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from internlm_kernels.reference import FP8_CACHE_DTYPES
from internlm_kernels.triton._host import (
    MAX_GRID_YZ, batch_slices, cdiv, next_power_of_2, num_sms, on_the_tensors_device,
)
from internlm_kernels.triton.rotary import _rotated_member

# Globals read inside kernels must be constexpr (the interpreter does not enforce it, the
# compiler does: scripts/compile_triton_kernels.py catches it without a GPU).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
SEQUENCE_SCAN_BLOCK = 128
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

# --------------------------------------------------------------------------------------
# tile configuration: the one place block sizes are chosen
# --------------------------------------------------------------------------------------


def _shapes(head_dim_padded: int, kernel: str):
    """Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) of kernel "fwd", "dkdv" or "dq",
    pruned by head dim so shared memory fits on A100/H100, registers do not spill
    (scripts/compile_triton_kernels.py reports both without a GPU), and the first call tunes
    only two or three configs.

    dK/dV: BLOCK_N keys own fp32 dK and dV tiles (2 * BLOCK_N * D floats) per program. At
    d = 128, 64 keys per 4 warps (one sm_90 warpgroup, m64) take about 40% of the
    instructions per flop of 8 warps, with 8-16 B of spills with a window on sm_90 (none
    causal) and 8 B on sm_80.

    dQ: BLOCK_M query rows own an fp32 dQ tile. Tiles of 64 rows per 4 warps or 128 per 8
    match sm_90's warpgroup mma (m64): their mask-free key loop takes about a third of the
    instructions per flop of the 32-row tile (SASS, triton 3.8). At d = 128 the 128-row tile
    spills 32-56 B on sm_80; the 32-row tile, first, spills nowhere."""
    if INTERPRETER:  # the CPU interpreter: small tiles keep numpy fast
        return [(16, 16, 4, 1)]
    if kernel == "dkdv":
        if head_dim_padded <= 64:
            return [(64, 64, 4, 2), (32, 64, 4, 2)]
        if head_dim_padded <= 128:
            return [(32, 64, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2)]
        return [(16, 32, 8, 1), (32, 32, 8, 1)]
    if kernel == "dq":
        if head_dim_padded <= 64:
            return [(128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)]
        if head_dim_padded <= 128:
            return [(32, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)]
        return [(16, 32, 8, 1), (32, 32, 8, 1)]
    # sm_90 ptxas (AOT, triton 3.8): d=128 128x64/8 warps spills 24 B, 128x32 none; a minimal
    # tutorial-style kernel spills 96 B at 128x64. d=256 spills in every shape tried (64x32 least).
    if head_dim_padded <= 64:
        return [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3)]
    if head_dim_padded <= 128:
        return [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)]
    return [(64, 32, 8, 2), (64, 64, 8, 2)]


def _config(shape) -> "triton.Config":
    block_m, block_n, warps, stages = shape
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# What a tuned tile shape is remembered for. Beside head dim, group size and mask kind, the
# length (``length_bucket``): a first call on short sequences (a warm-up, a short prompt)
# would otherwise fix the tiles of every later call, whose best shape differs once the grid
# has a few programs per SM instead of many waves. Triton's key takes argument values as they
# are, so the launchers pass the bucket as an argument the kernels do not read; a power of
# two keeps a varlen run, whose packed length changes every step, to a few tunings.
TUNING_KEY = ["HEAD_DIM", "GROUP", "IS_VARLEN", "HAS_LEFT", "HAS_RIGHT", "length_bucket"]
MIN_LENGTH_BUCKET = 128


def length_bucket(seqlen_q: int, seqlen_k: int) -> int:
    """The tuning key's length: the longer of the two (the packed length when varlen), up to
    the next power of two, at least MIN_LENGTH_BUCKET (a multiple of 16, so Triton
    specialises every bucket alike and a new bucket does not recompile a tuned shape)."""
    return max(MIN_LENGTH_BUCKET, next_power_of_2(max(seqlen_q, seqlen_k)))


def _autotuned(kernel, name: str):
    """Autotune ``kernel`` over ``_shapes(..., name)`` keyed on TUNING_KEY (Triton's cache
    key adds the GPU and the tensors' dtypes). Under the interpreter the launcher passes the
    single shape itself."""
    if INTERPRETER:
        return kernel
    every_shape = sorted({shape for dim in (64, 128, 256) for shape in _shapes(dim, name)})

    def prune(configs, named_args, **kwargs):
        shapes = _shapes(kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128)), name)
        if os.environ.get("INTERNLM_KERNELS_AUTOTUNE", "1") == "0":
            shapes = shapes[:1]  # first candidate only: fast first calls (test suites)
        kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in shapes]
        return kept or configs[:1]

    return triton.autotune(configs=[_config(shape) for shape in every_shape], key=TUNING_KEY,
                           prune_configs_by={"early_config_prune": prune})(kernel)


def _interpreter_blocks(head_dim_padded: int, kernel: str) -> dict:
    """BLOCK_M / BLOCK_N passed explicitly when there is no autotuner (the interpreter)."""
    if not INTERPRETER:
        return {}
    block_m, block_n, _, _ = _shapes(head_dim_padded, kernel)[0]
    return {"BLOCK_M": block_m, "BLOCK_N": block_n}


# --------------------------------------------------------------------------------------
# shared device helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _clamped_span(begin, end, total):
    """Tokens [begin, end) of a packed sequence, clamped into [0, total] with end >= begin. The
    cu_seqlens values are the caller's and go unchecked on the host (reading them there would
    sync the stream and stop CUDA graphs replaying with new lengths): clamped, a wrong one
    cannot move a load or a store outside the tensors. Valid ones pass unchanged."""
    begin = tl.minimum(tl.maximum(begin, 0), total)
    return begin, tl.minimum(tl.maximum(end, begin), total)


@triton.jit
def _locate_tile(CU_SEQLENS, num_sequences, total, tile, ROWS_PER_POSITION: tl.constexpr, BLOCK: tl.constexpr,
                 BLOCK_SEQS: tl.constexpr):
    """(sequence, tile within it) of a flattened tile index into a packed batch of ``total``
    tokens; sequence == num_sequences when the index lies past the last tile (the program
    then has nothing to do)."""
    sequence = tile * 0
    tiles_before = tile * 0
    running = tile * 0
    for start in range(0, num_sequences, BLOCK_SEQS):
        idx = start + tl.arange(0, BLOCK_SEQS)
        ok = idx < num_sequences
        begin, end = _clamped_span(tl.load(CU_SEQLENS + idx, mask=ok, other=0),
                                   tl.load(CU_SEQLENS + idx + 1, mask=ok, other=0), total)
        tiles = tl.where(ok, ((end - begin) * ROWS_PER_POSITION + BLOCK - 1) // BLOCK, 0)
        ends = running + tl.cumsum(tiles, axis=0)
        done = ok & (ends <= tile)
        sequence += tl.sum(done.to(tl.int32), axis=0)
        tiles_before = tl.maximum(tiles_before, tl.max(tl.where(done, ends, 0), axis=0))
        running += tl.sum(tiles, axis=0)
    return sequence, tile - tiles_before


@triton.jit
def _sequence_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, num_sequences, sequence, IS_VARLEN: tl.constexpr,
                     seqlen_q, seqlen_k):
    """(q start, q length, k start, k length) of a sequence; zero lengths past the last one.
    Starts are int64 (they only enter scalar base pointers); lengths, and every position and
    column derived from them, are int32, which keeps the per-tile masks in 32-bit registers."""
    if IS_VARLEN:
        valid = sequence < num_sequences
        s = tl.maximum(tl.minimum(sequence, num_sequences - 1), 0)
        q_begin, q_end = _clamped_span(tl.load(CU_SEQLENS_Q + s), tl.load(CU_SEQLENS_Q + s + 1), seqlen_q)
        k_begin, k_end = _clamped_span(tl.load(CU_SEQLENS_K + s), tl.load(CU_SEQLENS_K + s + 1), seqlen_k)
        q_len = tl.where(valid, q_end - q_begin, 0)
        k_len = tl.where(valid, k_end - k_begin, 0)
        q_start = q_begin.to(tl.int64)
        k_start = k_begin.to(tl.int64)
    else:
        q_start = tl.zeros([], dtype=tl.int64)
        k_start = tl.zeros([], dtype=tl.int64)
        q_len = tl.zeros([], dtype=tl.int32) + seqlen_q
        k_len = tl.zeros([], dtype=tl.int32) + seqlen_k
    return q_start, q_len, k_start, k_len


@triton.jit
def _program_tile(CU_SEQLENS_Q, CU_SEQLENS_K, num_sequences, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr,
                  TILE_KEYS: tl.constexpr, ROWS_PER_POSITION: tl.constexpr, BLOCK: tl.constexpr):
    """What a program of the (tiles, batch, kv head) grid works on: its tile index within the
    sequence (tiles of packed query rows, or of keys with TILE_KEYS), the batch row and KV
    head (int64), and the sequence bounds (see _sequence_bounds)."""
    tile = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    kv_head = tl.program_id(2).to(tl.int64)
    sequence = tl.program_id(1)
    if IS_VARLEN:
        if TILE_KEYS:
            sequence, tile = _locate_tile(CU_SEQLENS_K, num_sequences, seqlen_k, tile, ROWS_PER_POSITION, BLOCK, 128)
        else:
            sequence, tile = _locate_tile(CU_SEQLENS_Q, num_sequences, seqlen_q, tile, ROWS_PER_POSITION, BLOCK, 128)
    q_start, q_len, k_start, k_len = _sequence_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, num_sequences, sequence,
                                                      IS_VARLEN, seqlen_q, seqlen_k)
    return tile, batch, kv_head, q_start, q_len, k_start, k_len


@triton.jit
def _visible(rows_pos, cols, k_len, shift, window_left, window_right,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """[rows, cols] bool: which keys each query position sees (bottom-right aligned)."""
    ok = (cols < k_len)[None, :]
    if HAS_RIGHT:
        ok = ok & (cols[None, :] <= rows_pos[:, None] + shift + window_right)
    if HAS_LEFT:
        ok = ok & (cols[None, :] >= rows_pos[:, None] + shift - window_left)
    return ok


@triton.jit
def _key_range(pos_first, pos_last, k_len, shift, window_left, window_right,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks a tile of positions [pos_first, pos_last] touches: [lo, hi), and the inner
    range [full_lo, full_hi) of blocks every position sees entirely (no mask needed)."""
    hi = k_len
    full_hi = k_len
    if HAS_RIGHT:
        hi = tl.minimum(hi, pos_last + shift + window_right + 1)
        full_hi = tl.minimum(full_hi, pos_first + shift + window_right + 1)
    lo = hi * 0
    full_lo = hi * 0
    if HAS_LEFT:
        lo = tl.maximum(lo, pos_first + shift - window_left)
        full_lo = tl.maximum(full_lo, pos_last + shift - window_left)
    hi = tl.maximum(hi, 0)
    lo = tl.minimum(lo, hi) // BLOCK_N * BLOCK_N
    full_lo = tl.minimum(tl.maximum((full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi) // BLOCK_N * BLOCK_N, full_lo)
    return lo, full_lo, full_hi, hi


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K_BASE, V_BASE, stride_ks, stride_vs, start, end,
                    rows_pos, k_len, shift, window_left, window_right, qk_scale,
                    MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, EVEN_D: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over key blocks [start, end). K and V are read through block pointers:
    no per-element address or mask registers; boundary checks (zero padding) only where a
    tile can cross the sequence end (MASK blocks) or the head dim is padded."""
    k_t_block = tl.make_block_ptr(K_BASE, shape=(HEAD_DIM, k_len), strides=(1, stride_ks), offsets=(0, start),
                                  block_shape=(BLOCK_D, BLOCK_N), order=(0, 1))
    v_block = tl.make_block_ptr(V_BASE, shape=(k_len, HEAD_DIM), strides=(stride_vs, 1), offsets=(start, 0),
                                block_shape=(BLOCK_N, BLOCK_D), order=(1, 0))
    for start_n in range(start, end, BLOCK_N):
        if MASK:
            k = tl.load(k_t_block, boundary_check=(0, 1), padding_option="zero")
        elif EVEN_D:
            k = tl.load(k_t_block)
        else:
            k = tl.load(k_t_block, boundary_check=(0,), padding_option="zero")
        qk = tl.dot(q, k.to(q.dtype)) * qk_scale  # (.to: fp8 caches widen exactly to q's dtype)
        if MASK:
            cols = start_n + tl.arange(0, BLOCK_N)
            qk = tl.where(_visible(rows_pos, cols, k_len, shift, window_left, window_right, HAS_LEFT, HAS_RIGHT),
                          qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MASK:
            v = tl.load(v_block, boundary_check=(0, 1), padding_option="zero")
        elif EVEN_D:
            v = tl.load(v_block)
        else:
            v = tl.load(v_block, boundary_check=(1,), padding_option="zero")
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
        k_t_block = tl.advance(k_t_block, (0, BLOCK_N))
        v_block = tl.advance(v_block, (BLOCK_N, 0))
    return acc, l_i, m_i


@triton.jit
def _attn_paged_inner(acc, l_i, m_i, q, K_BASE, V_BASE, stride_ks, stride_vs, start, end,
                      rows_pos, k_len, shift, window_left, window_right, qk_scale,
                      PAGES, num_pages, stride_kp, stride_vp,
                      MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """_attn_fwd_inner over a paged cache: key j lives in row j % PAGE_SIZE of page
    PAGES[j // PAGE_SIZE] (page stride stride_kp / stride_vp). Each key's address is
    gathered (a block pointer cannot cross pages); page numbers are device values, clamped
    into [0, num_pages) so a wrong one cannot move a load outside the cache."""
    dims = tl.arange(0, BLOCK_D)
    dims_ok = dims < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < k_len
        page = tl.load(PAGES + cols // PAGE_SIZE, mask=col_ok, other=0)
        page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
        in_page = (cols % PAGE_SIZE).to(tl.int64)
        k = tl.load(K_BASE + (page * stride_kp + in_page * stride_ks)[None, :] + dims[:, None],
                    mask=col_ok[None, :] & dims_ok[:, None], other=0.0)
        qk = tl.dot(q, k.to(q.dtype)) * qk_scale
        if MASK:
            qk = tl.where(_visible(rows_pos, cols, k_len, shift, window_left, window_right, HAS_LEFT, HAS_RIGHT),
                          qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V_BASE + (page * stride_vp + in_page * stride_vs)[:, None] + dims[None, :],
                    mask=col_ok[:, None] & dims_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attend(q, K_BASE, V_BASE, stride_ks, stride_vs, lo, full_lo, full_hi, hi, rows_pos, k_len, shift,
            window_left, window_right, qk_scale, PAGES, num_pages, stride_kp, stride_vp,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Attention of a query tile over key blocks [lo, hi): masked edges, unmasked middle
    [full_lo, full_hi). Returns the normalised output (fp32) and the log2-sum-exp per row
    (-inf, with a zero output, for rows that see no key). PAGE_SIZE > 0: the keys are paged
    (_attn_paged_inner; PAGES is the sequence's row of the block table); 0: K_BASE / V_BASE
    rows at stride_ks / stride_vs (the page arguments unused)."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    args = (K_BASE, V_BASE, stride_ks, stride_vs)
    if PAGE_SIZE > 0:
        pages = (PAGES, num_pages, stride_kp, stride_vp)
        acc, l_i, m_i = _attn_paged_inner(acc, l_i, m_i, q, *args, lo, full_lo, rows_pos, k_len, shift, window_left,
                                          window_right, qk_scale, *pages, True, HAS_LEFT, HAS_RIGHT, HEAD_DIM,
                                          BLOCK_D, BLOCK_N, PAGE_SIZE)
        acc, l_i, m_i = _attn_paged_inner(acc, l_i, m_i, q, *args, full_lo, full_hi, rows_pos, k_len, shift,
                                          window_left, window_right, qk_scale, *pages, False, HAS_LEFT, HAS_RIGHT,
                                          HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE)
        acc, l_i, m_i = _attn_paged_inner(acc, l_i, m_i, q, *args, full_hi, hi, rows_pos, k_len, shift, window_left,
                                          window_right, qk_scale, *pages, True, HAS_LEFT, HAS_RIGHT, HEAD_DIM,
                                          BLOCK_D, BLOCK_N, PAGE_SIZE)
    else:
        even_d: tl.constexpr = BLOCK_D == HEAD_DIM
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, *args, lo, full_lo, rows_pos, k_len, shift, window_left,
                                        window_right, qk_scale, True, HAS_LEFT, HAS_RIGHT, even_d, HEAD_DIM, BLOCK_D,
                                        BLOCK_N)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, *args, full_lo, full_hi, rows_pos, k_len, shift,
                                        window_left, window_right, qk_scale, False, HAS_LEFT, HAS_RIGHT, even_d,
                                        HEAD_DIM, BLOCK_D, BLOCK_N)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, *args, full_hi, hi, rows_pos, k_len, shift, window_left,
                                        window_right, qk_scale, True, HAS_LEFT, HAS_RIGHT, even_d, HEAD_DIM, BLOCK_D,
                                        BLOCK_N)
    # Rows that see no key (l_i exactly 0): zeros and lse -inf. NaN scores keep a NaN l_i, so a
    # NaN input gives NaN out and lse.
    seen = l_i != 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    return out, lse2


@triton.jit
def _packed_rows(tile, q_len, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of a query tile: (row index, position, head within the group, first / last
    position of the tile, in-range mask); all int32."""
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len * GROUP
    pos_first = tile * BLOCK_M // GROUP
    pos_last = tl.maximum(tl.minimum((tile + 1) * BLOCK_M, q_len * GROUP) - 1, 0) // GROUP
    return rows // GROUP, rows % GROUP, pos_first, pos_last, row_ok


@triton.jit
def _packed_row_offsets(rows_pos, rows_sub, pos_first, stride_s, stride_h, WIDE_ROWS: tl.constexpr):
    """Each packed row's offset from the tile's first position of the group's first head. A
    tile spans the group's heads and up to BLOCK_M / GROUP positions, so with a
    head-major layout ((B, H, S, D) transposed, stride_h = S * D) (GROUP - 1) * stride_h
    passes 2^31 from S = 2.4M at 8 heads a group (0.5M at 32), and with a sequence-major one
    ((S, B, H, D) transposed) 127 * stride_s from B * H * D = 17M, where int32 offsets wrap.
    int64 only where the launcher finds they can (WIDE_ROWS, _wide_rows): in int64 the
    d = 128 varlen forward spilled 64 B instead of 24 on sm_90."""
    if WIDE_ROWS:
        return (rows_pos - pos_first).to(tl.int64) * stride_s + rows_sub.to(tl.int64) * stride_h
    return (rows_pos - pos_first) * stride_s + rows_sub * stride_h


@triton.jit
def _attn_fwd_kernel(
    Q, stride_qb, stride_qs, stride_qh,
    K, stride_kb, stride_ks, stride_kh,
    V, stride_vb, stride_vs, stride_vh,
    O, stride_ob, stride_os, stride_oh,
    LSE, stride_lb, stride_lh, stride_ls,
    CU_SEQLENS_Q, CU_SEQLENS_K, num_sequences,
    seqlen_q, seqlen_k, qk_scale, window_left, window_right, length_bucket,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, WIDE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tile, batch, kv_head, q_start, q_len, k_start, k_len = _program_tile(
        CU_SEQLENS_Q, CU_SEQLENS_K, num_sequences, seqlen_q, seqlen_k, IS_VARLEN, False, GROUP, BLOCK_M)
    rows_pos, rows_sub, pos_first, pos_last, row_ok = _packed_rows(tile, q_len, GROUP, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dims_ok = dims < HEAD_DIM
    shift = k_len - q_len

    # Scalar int64 bases; per-row offsets (int64 where they can pass 2^31: WIDE_ROWS); int32 columns.
    q_rows = (_packed_row_offsets(rows_pos, rows_sub, pos_first, stride_qs, stride_qh, WIDE_ROWS)[:, None]
              + dims[None, :])
    Q_BASE = Q + batch * stride_qb + (q_start + pos_first) * stride_qs + kv_head * GROUP * stride_qh
    q = tl.load(Q_BASE + q_rows, mask=row_ok[:, None] & dims_ok[None, :], other=0.0)
    K_BASE = K + batch * stride_kb + k_start * stride_ks + kv_head * stride_kh
    V_BASE = V + batch * stride_vb + k_start * stride_vs + kv_head * stride_vh

    lo, full_lo, full_hi, hi = _key_range(pos_first, pos_last, k_len, shift, window_left, window_right,
                                          HAS_LEFT, HAS_RIGHT, BLOCK_N)
    hi = tl.where(q_len > 0, hi, 0)
    out, lse2 = _attend(q, K_BASE, V_BASE, stride_ks, stride_vs, lo, full_lo, full_hi, hi, rows_pos, k_len, shift,
                        window_left, window_right, qk_scale, K, 0, 0, 0, HAS_LEFT, HAS_RIGHT, HEAD_DIM, BLOCK_M,
                        BLOCK_D, BLOCK_N, 0)

    lse = lse2 * LN2
    o_rows = (_packed_row_offsets(rows_pos, rows_sub, pos_first, stride_os, stride_oh, WIDE_ROWS)[:, None]
              + dims[None, :])
    O_BASE = O + batch * stride_ob + (q_start + pos_first) * stride_os + kv_head * GROUP * stride_oh
    tl.store(O_BASE + o_rows, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dims_ok[None, :])
    tl.store(LSE + batch * stride_lb + (kv_head * GROUP + rows_sub) * stride_lh + (q_start + rows_pos) * stride_ls,
             lse, mask=row_ok)


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_delta_kernel(
    O, stride_ob, stride_os, stride_oh,
    DO, stride_dob, stride_dos, stride_doh,
    DELTA, stride_lb, stride_lh, stride_ls,
    seqlen, heads, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """delta[b, h, s] = sum_d dO * O (fp32): the softmax-gradient correction per query row."""
    positions = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    batch = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    mask = (positions < seqlen)[:, None] & (dims < HEAD_DIM)[None, :]
    o = tl.load(O + batch * stride_ob + positions[:, None] * stride_os + head * stride_oh + dims[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + batch * stride_dob + positions[:, None] * stride_dos + head * stride_doh + dims[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + batch * stride_lb + head * stride_lh + positions * stride_ls, tl.sum(o * do, axis=1),
             mask=positions < seqlen)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, stride_qb, stride_qs, stride_qh,
    K, stride_kb, stride_ks, stride_kh,
    V, stride_vb, stride_vs, stride_vh,
    DO, stride_dob, stride_dos, stride_doh,
    DK, stride_dkb, stride_dks, stride_dkh,
    DV, stride_dvb, stride_dvs, stride_dvh,
    LSE, DELTA, stride_lb, stride_lh, stride_ls,
    CU_SEQLENS_Q, CU_SEQLENS_K, num_sequences,
    seqlen_q, seqlen_k, qk_scale, sm_scale, window_left, window_right, length_bucket,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, WIDE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tile, batch, kv_head, q_start, q_len, k_start, k_len = _program_tile(
        CU_SEQLENS_Q, CU_SEQLENS_K, num_sequences, seqlen_q, seqlen_k, IS_VARLEN, True, 1, BLOCK_N)
    shift = k_len - q_len
    col_first = tile * BLOCK_N
    cols = col_first + tl.arange(0, BLOCK_N)
    col_ok = cols < k_len
    dims = tl.arange(0, BLOCK_D)
    dims_ok = dims < HEAD_DIM
    kv_mask = col_ok[:, None] & dims_ok[None, :]
    local = tl.arange(0, BLOCK_N)[:, None]
    k_base = batch * stride_kb + (k_start + col_first) * stride_ks + kv_head * stride_kh
    v_base = batch * stride_vb + (k_start + col_first) * stride_vs + kv_head * stride_vh
    k = tl.load(K + k_base + local * stride_ks + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + v_base + local * stride_vs + dims[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query positions that can see some key of this tile, as packed rows of the group.
    col_last = tl.minimum(col_first + BLOCK_N, k_len) - 1
    pos_lo = q_len * 0
    pos_hi = q_len
    if HAS_RIGHT:
        pos_lo = tl.maximum(pos_lo, col_first - shift - window_right)
    if HAS_LEFT:
        pos_hi = tl.minimum(pos_hi, col_last - shift + window_left + 1)
    pos_hi = tl.where(k_len > 0, pos_hi, 0)
    row_lo = tl.minimum(pos_lo, q_len) * GROUP // BLOCK_M * BLOCK_M
    row_hi = tl.maximum(pos_hi, 0) * GROUP
    Q_BASE = Q + batch * stride_qb + q_start * stride_qs + kv_head * GROUP * stride_qh
    DO_BASE = DO + batch * stride_dob + q_start * stride_dos + kv_head * GROUP * stride_doh
    for start_m in range(row_lo, row_hi, BLOCK_M):
        rows_pos, rows_sub, pos_first, _, row_ok = _packed_rows(start_m // BLOCK_M, q_len, GROUP, BLOCK_M)
        q_mask = row_ok[:, None] & dims_ok[None, :]
        q_rows = _packed_row_offsets(rows_pos, rows_sub, pos_first, stride_qs, stride_qh, WIDE_ROWS)
        do_rows = _packed_row_offsets(rows_pos, rows_sub, pos_first, stride_dos, stride_doh, WIDE_ROWS)
        q = tl.load(Q_BASE + tl.cast(pos_first, tl.int64) * stride_qs + q_rows[:, None] + dims[None, :],
                    mask=q_mask, other=0.0)
        do = tl.load(DO_BASE + tl.cast(pos_first, tl.int64) * stride_dos + do_rows[:, None] + dims[None, :],
                     mask=q_mask, other=0.0)
        stats = batch * stride_lb + (kv_head * GROUP + rows_sub) * stride_lh + (q_start + rows_pos) * stride_ls
        lse = tl.load(LSE + stats, mask=row_ok, other=0.0) * LOG2E
        lse = tl.where(lse == float("-inf"), 0.0, lse)  # rows that see no key: p is masked to 0 below
        delta = tl.load(DELTA + stats, mask=row_ok, other=0.0)
        # Transposed scores: [keys, rows]
        qk_t = tl.dot(k, tl.trans(q)) * qk_scale
        visible = tl.trans(_visible(rows_pos, cols, k_len, shift, window_left, window_right, HAS_LEFT, HAS_RIGHT))
        p_t = tl.where(visible & row_ok[None, :], tl.math.exp2(qk_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    dk = dk * sm_scale
    dk_base = batch * stride_dkb + (k_start + col_first) * stride_dks + kv_head * stride_dkh
    dv_base = batch * stride_dvb + (k_start + col_first) * stride_dvs + kv_head * stride_dvh
    tl.store(DK + dk_base + local * stride_dks + dims[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + dv_base + local * stride_dvs + dims[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, K_BASE, V_BASE, stride_ks, stride_vs, start, end, rows_pos, row_ok,
                       k_len, shift, window_left, window_right, qk_scale,
                       MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ over key blocks [start, end). MASK blocks apply the causal / window mask and the keys'
    end (and check the K / V loads' bounds); the others are seen whole by every row of the
    tile, whose padding rows (past the sequence) have q = 0 and dO = 0, so dS = 0 there."""
    k_t_block = tl.make_block_ptr(K_BASE, shape=(HEAD_DIM, k_len), strides=(1, stride_ks), offsets=(0, start),
                                  block_shape=(BLOCK_D, BLOCK_N), order=(0, 1))
    v_t_block = tl.make_block_ptr(V_BASE, shape=(HEAD_DIM, k_len), strides=(1, stride_vs), offsets=(0, start),
                                  block_shape=(BLOCK_D, BLOCK_N), order=(0, 1))
    for start_n in range(start, end, BLOCK_N):
        if MASK:
            k_t = tl.load(k_t_block, boundary_check=(0, 1), padding_option="zero")
            v_t = tl.load(v_t_block, boundary_check=(0, 1), padding_option="zero")
        elif BLOCK_D == HEAD_DIM:
            k_t = tl.load(k_t_block)
            v_t = tl.load(v_t_block)
        else:
            k_t = tl.load(k_t_block, boundary_check=(0,), padding_option="zero")
            v_t = tl.load(v_t_block, boundary_check=(0,), padding_option="zero")
        k_t_block = tl.advance(k_t_block, (0, BLOCK_N))
        v_t_block = tl.advance(v_t_block, (0, BLOCK_N))
        qk = tl.dot(q, k_t) * qk_scale
        if MASK:
            cols = start_n + tl.arange(0, BLOCK_N)
            visible = _visible(rows_pos, cols, k_len, shift, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            p = tl.where(visible & row_ok[:, None], tl.math.exp2(qk - lse[:, None]), 0.0)
        else:
            p = tl.math.exp2(qk - lse[:, None])
        dp = tl.dot(do, v_t)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t))
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, stride_qb, stride_qs, stride_qh,
    K, stride_kb, stride_ks, stride_kh,
    V, stride_vb, stride_vs, stride_vh,
    DO, stride_dob, stride_dos, stride_doh,
    DQ, stride_dqb, stride_dqs, stride_dqh,
    LSE, DELTA, stride_lb, stride_lh, stride_ls,
    CU_SEQLENS_Q, CU_SEQLENS_K, num_sequences,
    seqlen_q, seqlen_k, qk_scale, sm_scale, window_left, window_right, length_bucket,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, WIDE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tile, batch, kv_head, q_start, q_len, k_start, k_len = _program_tile(
        CU_SEQLENS_Q, CU_SEQLENS_K, num_sequences, seqlen_q, seqlen_k, IS_VARLEN, False, GROUP, BLOCK_M)
    shift = k_len - q_len
    rows_pos, rows_sub, pos_first, pos_last, row_ok = _packed_rows(tile, q_len, GROUP, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dims_ok = dims < HEAD_DIM
    q_mask = row_ok[:, None] & dims_ok[None, :]
    first = q_start + pos_first
    q_rows = _packed_row_offsets(rows_pos, rows_sub, pos_first, stride_qs, stride_qh, WIDE_ROWS)
    do_rows = _packed_row_offsets(rows_pos, rows_sub, pos_first, stride_dos, stride_doh, WIDE_ROWS)
    q = tl.load(Q + batch * stride_qb + first * stride_qs + kv_head * GROUP * stride_qh
                + q_rows[:, None] + dims[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + batch * stride_dob + first * stride_dos + kv_head * GROUP * stride_doh
                 + do_rows[:, None] + dims[None, :], mask=q_mask, other=0.0)
    stats = batch * stride_lb + (kv_head * GROUP + rows_sub) * stride_lh + (q_start + rows_pos) * stride_ls
    lse = tl.load(LSE + stats, mask=row_ok, other=0.0) * LOG2E
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(DELTA + stats, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _key_range(pos_first, pos_last, k_len, shift, window_left, window_right,
                                          HAS_LEFT, HAS_RIGHT, BLOCK_N)
    hi = tl.where(q_len > 0, hi, 0)
    K_BASE = K + batch * stride_kb + k_start * stride_ks + kv_head * stride_kh
    V_BASE = V + batch * stride_vb + k_start * stride_vs + kv_head * stride_vh
    # Masked edges, unmasked middle [full_lo, full_hi), as in the forward. Without a left
    # window every row sees the first keys (full_lo == lo): no leading masked loop. The
    # trailing masked blocks go before the middle: so ordered, ptxas (sm_90, triton 3.8) fits
    # the 64-row tile at d = 128 in 193 registers; the other way it spilled 40 B.
    args = (q, do, lse, delta, K_BASE, V_BASE, stride_ks, stride_vs)
    tail = (rows_pos, row_ok, k_len, shift, window_left, window_right, qk_scale)
    if HAS_LEFT:
        dq = _attn_bwd_dq_inner(dq, *args, lo, full_lo, *tail, True, HAS_LEFT, HAS_RIGHT, HEAD_DIM, BLOCK_D,
                                BLOCK_N)
    dq = _attn_bwd_dq_inner(dq, *args, full_hi, hi, *tail, True, HAS_LEFT, HAS_RIGHT, HEAD_DIM, BLOCK_D, BLOCK_N)
    dq = _attn_bwd_dq_inner(dq, *args, full_lo, full_hi, *tail, False, HAS_LEFT, HAS_RIGHT, HEAD_DIM, BLOCK_D,
                            BLOCK_N)
    dq = dq * sm_scale
    dq_rows = _packed_row_offsets(rows_pos, rows_sub, pos_first, stride_dqs, stride_dqh, WIDE_ROWS)
    tl.store(DQ + batch * stride_dqb + first * stride_dqs + kv_head * GROUP * stride_dqh
             + dq_rows[:, None] + dims[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------
# KV cache: append, split-KV attention, combine
# --------------------------------------------------------------------------------------


@triton.jit
def _rotated(ptrs, x, dims, mask, positions, COS, SIN, stride_cos, stride_sin, table_len, rotary_half,
             INTERLEAVED: tl.constexpr):
    """Rotary inside the KV-cache kernels: ``x`` (fp32, loaded from ``ptrs`` at feature
    ``dims``) rotated at ``positions`` by the rotary kernel's _rotated_member; NaN outside the table,
    features past 2 * rotary_half and masked-off elements unchanged."""
    if INTERLEAVED:
        first = (dims % 2) == 0
        j = dims // 2
        partner = tl.where(first, 1, -1)
    else:
        first = dims < rotary_half
        j = tl.where(first, dims, dims - rotary_half)
        partner = tl.where(first, rotary_half, -rotary_half)
    rotates = mask & (dims < 2 * rotary_half)
    in_table = rotates & (positions >= 0) & (positions < table_len)
    other = tl.load(ptrs + partner, mask=rotates, other=0.0).to(tl.float32)
    row = positions.to(tl.int64)
    cos = tl.load(COS + row * stride_cos + j, mask=in_table, other=float("nan")).to(tl.float32)
    sin = tl.load(SIN + row * stride_sin + j, mask=in_table, other=float("nan")).to(tl.float32)
    rotated = _rotated_member(x, other, cos, sin, tl.where(first, -1.0, 1.0))
    return tl.where(rotates, rotated, x)


@triton.jit
def _fp8_grid(x, scale, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr, LARGEST: tl.constexpr):
    """``x / scale`` (fp32, divided with IEEE rounding) clamped to [-LARGEST, LARGEST] and
    rounded to nearest even on the grid of an fp8 format with MANTISSA_BITS and normal
    exponents from MIN_EXPONENT (subnormals below), as fp32; NaN stays NaN. The conversion to
    the fp8 type that follows is then exact, so the stored bits are torch's
    ``clamp(x / scale).to(fp8)`` whatever the conversion's own rounding (Triton's interpreter
    rounds such conversions wrongly where the mantissa carries into the exponent)."""
    x = tl.math.div_rn(x, scale)
    magnitude = tl.minimum(tl.abs(x), LARGEST)
    exponent = tl.maximum((magnitude.to(tl.int32, bitcast=True) >> 23) - 127, MIN_EXPONENT)
    step = ((exponent - MANTISSA_BITS + 127) << 23).to(tl.float32, bitcast=True)  # the grid's spacing there
    # Adding 2^23 steps leaves fp32 a spacing of one step: the sum is rounded to the grid
    # (to nearest even), and taking it away again is exact.
    shift = step * 8388608.0
    magnitude = (magnitude + shift) - shift
    rounded = tl.where(x.to(tl.int32, bitcast=True) < 0, -magnitude, magnitude)  # the sign bit, -0 included
    return tl.where(x != x, x, rounded)


@triton.jit
def _kvcache_append_kernel(
    K, stride_kb, stride_ks, stride_kh,
    V, stride_vb, stride_vs, stride_vh,
    K_CACHE, stride_kcb, stride_kcs, stride_kch,
    V_CACHE, stride_vcb, stride_vcs, stride_vch,
    CACHE_SEQLENS, capacity, heads,
    COS, SIN, stride_cos, stride_sin, table_len, rotary_half,
    BLOCK_TABLE, stride_table, num_pages,
    K_SCALE, V_SCALE, stride_k_scale, stride_v_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    FP8_MANTISSA_BITS: tl.constexpr, FP8_MIN_EXPONENT: tl.constexpr, FP8_LARGEST: tl.constexpr,
):
    """k_cache[b, cache_seqlens[b] + i] = k[b, i] (rotated at that position when ROTARY) and
    v_cache[...] = v[b, i]: programs over the k heads, then the v heads. Slots past the
    capacity are skipped (the attention then reports the overflow as NaN). PAGE_SIZE > 0:
    slot s of sequence b is row s % PAGE_SIZE of page BLOCK_TABLE[b, s // PAGE_SIZE] (page
    numbers clamped into [0, num_pages), as the attention reads them). FP8_MANTISSA_BITS > 0:
    fp8 caches, each entry stored as _fp8_grid(entry / the head's scale), the rotated k
    rounded to k's dtype first (as the rotary op returns it)."""
    i = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(1).to(tl.int64)
    which = tl.program_id(2)
    slot = tl.load(CACHE_SEQLENS + batch).to(tl.int64) + i
    dims = tl.arange(0, BLOCK_D)
    in_cache = (slot < capacity) & (slot >= 0)
    mask = (dims < HEAD_DIM) & in_cache
    row = slot  # the cache row: (batch, slot), or (page, slot within it)
    cache_batch = batch
    if PAGE_SIZE > 0:
        page = tl.load(BLOCK_TABLE + batch * stride_table + slot // PAGE_SIZE, mask=in_cache, other=0)
        cache_batch = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
        row = slot % PAGE_SIZE
    if which < heads:
        head = which.to(tl.int64)
        source = K + batch * stride_kb + i * stride_ks + head * stride_kh + dims
        k_values = tl.load(source, mask=mask).to(tl.float32)
        if ROTARY:
            k_values = _rotated(source, k_values, dims, mask, slot, COS, SIN, stride_cos, stride_sin, table_len,
                                rotary_half, INTERLEAVED)
        if FP8_MANTISSA_BITS > 0:
            k_scale = tl.load(K_SCALE + head * stride_k_scale)
            k_values = _fp8_grid(k_values.to(K.dtype.element_ty).to(tl.float32), k_scale, FP8_MANTISSA_BITS,
                                 FP8_MIN_EXPONENT, FP8_LARGEST)
        target = K_CACHE + cache_batch * stride_kcb + row * stride_kcs + head * stride_kch + dims
        tl.store(target, k_values.to(K_CACHE.dtype.element_ty), mask=mask)
    else:
        head = (which - heads).to(tl.int64)
        v_values = tl.load(V + batch * stride_vb + i * stride_vs + head * stride_vh + dims, mask=mask)
        if FP8_MANTISSA_BITS > 0:
            v_values = _fp8_grid(v_values.to(tl.float32), tl.load(V_SCALE + head * stride_v_scale),
                                 FP8_MANTISSA_BITS, FP8_MIN_EXPONENT, FP8_LARGEST)
        tl.store(V_CACHE + cache_batch * stride_vcb + row * stride_vcs + head * stride_vch + dims,
                 v_values.to(V_CACHE.dtype.element_ty), mask=mask)


@triton.jit
def _attn_decode_split_kernel(
    Q, stride_qb, stride_qs, stride_qh,
    K, stride_kb, stride_ks, stride_kh,
    V, stride_vb, stride_vs, stride_vh,
    PART_O, PART_LSE,
    CACHE_SEQLENS, heads_kv, seqlen_q, new_tokens, capacity, splits, rows_padded,
    qk_scale, window_left, window_right,
    COS, SIN, stride_cos, stride_sin, table_len, rotary_half,
    BLOCK_TABLE, stride_table, num_pages,
    K_SCALE, V_SCALE, stride_k_scale, stride_v_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, PAGE_SIZE: tl.constexpr, WIDE_ROWS: tl.constexpr,
    SCALED_CACHE: tl.constexpr,
):
    """One tile of packed query rows against one split of one sequence's cache (flash-decoding).
    Writes the split's normalised output and its log2-sum-exp to the fp32 workspace. Grid:
    (B x Hkv, row tiles, splits) (see attention_decode). SCALED_CACHE (fp8 caches): the
    entries widen exactly to q's dtype, the KV head's k scale joins the softmax scale and its v
    scale multiplies the output, so the products run on the stored values."""
    batch_head = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    batch = batch_head // heads_kv
    kv_head = batch_head % heads_kv
    k_len = tl.load(CACHE_SEQLENS + batch) + new_tokens  # valid keys after the append (int32)
    q_len = tl.zeros([], dtype=tl.int32) + seqlen_q
    shift = k_len - q_len
    k_len = tl.minimum(k_len, capacity)  # past the capacity: reported as NaN by the combine
    rows_pos, rows_sub, pos_first, pos_last, row_ok = _packed_rows(tile, q_len, GROUP, BLOCK_M)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dims_ok = dims < HEAD_DIM
    q_ptrs = (Q + batch * stride_qb + tl.cast(pos_first, tl.int64) * stride_qs + kv_head * GROUP * stride_qh
              + _packed_row_offsets(rows_pos, rows_sub, pos_first, stride_qs, stride_qh, WIDE_ROWS)[:, None]
              + dims[None, :])
    q_mask = row_ok[:, None] & dims_ok[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    if ROTARY:  # q rotates as it loads, at position cache_seqlens[b] + s, rounded as the rotary op rounds
        positions = (tl.load(CACHE_SEQLENS + batch) + rows_pos)[:, None]
        q = _rotated(q_ptrs, q.to(tl.float32), dims[None, :], q_mask, positions, COS, SIN, stride_cos, stride_sin,
                     table_len, rotary_half, INTERLEAVED).to(Q.dtype.element_ty)
    if PAGE_SIZE > 0:  # pages: (num_pages, PAGE_SIZE, Hkv, D), this sequence's in its block-table row
        K_BASE = K + kv_head * stride_kh
        V_BASE = V + kv_head * stride_vh
    else:
        K_BASE = K + batch * stride_kb + kv_head * stride_kh
        V_BASE = V + batch * stride_vb + kv_head * stride_vh
    PAGES = BLOCK_TABLE + batch * stride_table

    if SCALED_CACHE:
        qk_scale = qk_scale * tl.load(K_SCALE + kv_head * stride_k_scale)

    lo, full_lo, full_hi, hi = _key_range(pos_first, pos_last, k_len, shift, window_left, window_right,
                                          HAS_LEFT, HAS_RIGHT, BLOCK_N)
    # This program's split of the keys the tile sees: their tiles dealt out in equal runs over
    # the splits, so the splits share a short sequence in a long cache as evenly as a full one
    # (a split past the last run is empty: its lse is -inf, which the combine skips).
    seen_tiles = (tl.maximum(hi - lo, 0) + BLOCK_N - 1) // BLOCK_N  # lo: whole tiles
    tiles_per_split = (seen_tiles + splits - 1) // splits
    lo += split * tiles_per_split * BLOCK_N
    hi = tl.maximum(tl.minimum(hi, lo + tiles_per_split * BLOCK_N), lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    out, lse2 = _attend(q, K_BASE, V_BASE, stride_ks, stride_vs, lo, full_lo, full_hi, hi, rows_pos, k_len, shift,
                        window_left, window_right, qk_scale, PAGES, num_pages, stride_kb, stride_vb,
                        HAS_LEFT, HAS_RIGHT, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_N, PAGE_SIZE)
    if SCALED_CACHE:
        out = out * tl.load(V_SCALE + kv_head * stride_v_scale)
    slot = ((batch * heads_kv + kv_head) * splits + split) * rows_padded + rows.to(tl.int64)
    tl.store(PART_O + slot[:, None] * BLOCK_D + dims[None, :], out, mask=row_ok[:, None])
    tl.store(PART_LSE + slot, lse2, mask=row_ok)


@triton.jit
def _attn_decode_combine_kernel(
    PART_O, PART_LSE,
    O, stride_ob, stride_os, stride_oh,
    CACHE_SEQLENS, heads_kv, new_tokens, capacity, splits, rows, rows_padded,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    """Merge the splits of one packed query row: softmax-weighted by each split's sum-exp.
    Grid: (rows x B x Hkv,), rows fastest."""
    row = (tl.program_id(0) % rows).to(tl.int64)  # 32-bit division: the grid's x is below 2^31
    batch_head = (tl.program_id(0) // rows).to(tl.int64)
    batch = batch_head // heads_kv
    kv_head = batch_head % heads_kv
    dims = tl.arange(0, BLOCK_D)
    base = (batch * heads_kv + kv_head) * splits * rows_padded + row
    m = tl.full([], float("-inf"), dtype=tl.float32)
    total = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, splits, BLOCK_SPLITS):
        idx = start + tl.arange(0, BLOCK_SPLITS)
        ok = idx < splits
        slot = base + idx.to(tl.int64) * rows_padded
        lse = tl.load(PART_LSE + slot, mask=ok, other=float("-inf"))
        part = tl.load(PART_O + slot[:, None] * BLOCK_D + dims[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        weight = tl.math.exp2(lse - m_safe)
        alpha = tl.math.exp2(m - m_safe)
        acc = acc * alpha + tl.sum(weight[:, None] * part, axis=0)
        total = total * alpha + tl.sum(weight, axis=0)
        m = m_new
    out = acc / tl.where(total > 0.0, total, 1.0)
    length = tl.load(CACHE_SEQLENS + batch).to(tl.int64)
    out = tl.where((length < 0) | (length + new_tokens > capacity), float("nan"), out)  # a length out of range
    position = row // GROUP
    head = kv_head * GROUP + row % GROUP
    tl.store(O + batch * stride_ob + position * stride_os + head * stride_oh + dims, out.to(O.dtype.element_ty),
             mask=dims < HEAD_DIM)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------

_fwd = _autotuned(_attn_fwd_kernel, "fwd")
_dkdv = _autotuned(_attn_bwd_dkdv_kernel, "dkdv")
_dq = _autotuned(_attn_bwd_dq_kernel, "dq")


def _mask_args(causal: bool, window_size):
    left, right = window_size
    if causal:
        right = 0
    return dict(window_left=max(left, 0), window_right=max(right, 0)), left >= 0, right >= 0


def _grid(rows: int, sequences: int, varlen: bool, batch: int, heads_kv: int, block_key: str):
    """Dense: (tiles per sequence, B, Hkv). Packed: every sequence's tiles numbered in one axis,
    bounded by total_rows / BLOCK + B (each sequence wastes at most one partial tile)."""
    if varlen:
        return lambda meta: (cdiv(rows, meta[block_key]) + sequences, 1, heads_kv)
    return lambda meta: (cdiv(rows, meta[block_key]), batch, heads_kv)


def _wide_rows(group: int, *tensors) -> bool:
    """Whether a query tile's row offsets (up to 128 positions of one group's heads, in
    (B, S, H, D) views) can pass 2^31 elements in one of ``tensors``: then the kernels take
    them in int64 (WIDE_ROWS)."""
    return any(129 * t.stride(1) + (group - 1) * t.stride(2) + t.shape[-1] >= 2**31 for t in tensors)


def _strides(t):
    return t.stride()[:3]  # one call: each stride(i) is a call into torch of its own


@on_the_tensors_device
def attention_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale: float, causal: bool,
                  window_size) -> None:
    """q/out (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) views (packed: B = 1 and cu_seqlens given);
    lse (B, Hq, Sq) fp32 view. Writes out and lse."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    if cu_seqlens_q is None and batch > MAX_GRID_YZ:  # the grid's batch axis: a launch per slice
        for rows in batch_slices(batch):
            attention_fwd(q[rows], k[rows], v[rows], out[rows], lse[rows], None, None, softmax_scale, causal,
                          window_size)
        return
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    varlen = cu_seqlens_q is not None
    sequences = cu_seqlens_q.shape[0] - 1 if varlen else batch
    window, has_left, has_right = _mask_args(causal, window_size)
    block_d = max(16, next_power_of_2(head_dim))
    cu_q = cu_seqlens_q if varlen else lse
    cu_k = cu_seqlens_k if varlen else lse
    _fwd[_grid(seqlen_q * group, sequences, varlen, batch, heads_kv, "BLOCK_M")](
        q, *_strides(q), k, *_strides(k), v, *_strides(v), out, *_strides(out), lse, *_strides(lse),
        cu_q, cu_k, sequences, seqlen_q, seqlen_k, softmax_scale * LOG2E.value, **window,
        length_bucket=length_bucket(seqlen_q, seqlen_k), GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d,
        IS_VARLEN=varlen, HAS_LEFT=has_left, HAS_RIGHT=has_right, WIDE_ROWS=_wide_rows(group, q, out),
        **_interpreter_blocks(block_d, "fwd"),
    )


@on_the_tensors_device
def attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale: float,
                  causal: bool, window_size, deterministic: bool = True) -> None:
    """Gradients of attention_fwd. Same layouts; dq/dk/dv are written (packed padding rows are
    left as the caller initialised them). Always deterministic (dK/dV and dQ kernels, no
    atomics); ``deterministic`` is accepted for the CUDA launcher's signature."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    if cu_seqlens_q is None and batch > MAX_GRID_YZ:  # the grid's batch axis: a launch per slice
        for rows in batch_slices(batch):
            attention_bwd(dout[rows], q[rows], k[rows], v[rows], out[rows], lse[rows], dq[rows], dk[rows], dv[rows],
                          None, None, softmax_scale, causal, window_size, deterministic)
        return
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    varlen = cu_seqlens_q is not None
    sequences = cu_seqlens_q.shape[0] - 1 if varlen else batch
    window, has_left, has_right = _mask_args(causal, window_size)
    block_d = max(16, next_power_of_2(head_dim))
    cu_q = cu_seqlens_q if varlen else lse
    cu_k = cu_seqlens_k if varlen else lse

    delta = torch.empty_like(lse)
    # 4096 elements per tile and tensor: 32 fp32 values per thread of 4 warps, no spills at d = 256.
    block_s = 16 if INTERPRETER else max(16, 4096 // block_d)
    _attn_bwd_delta_kernel[(cdiv(seqlen_q, block_s), batch, heads_q)](
        out, *_strides(out), dout, *_strides(dout), delta, *_strides(lse),
        seqlen_q, heads_q, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=block_s,
    )
    common = dict(length_bucket=length_bucket(seqlen_q, seqlen_k), GROUP=group, HEAD_DIM=head_dim,
                  BLOCK_D=block_d, IS_VARLEN=varlen, HAS_LEFT=has_left, HAS_RIGHT=has_right,
                  WIDE_ROWS=_wide_rows(group, q, dout, dq))
    tensors = (q, *_strides(q), k, *_strides(k), v, *_strides(v), dout, *_strides(dout))
    scalars = (cu_q, cu_k, sequences, seqlen_q, seqlen_k, softmax_scale * LOG2E.value, softmax_scale)
    _dkdv[_grid(seqlen_k, sequences, varlen, batch, heads_kv, "BLOCK_N")](
        *tensors, dk, *_strides(dk), dv, *_strides(dv), lse, delta, *_strides(lse), *scalars, **window, **common,
        **_interpreter_blocks(block_d, "dkdv"))
    _dq[_grid(seqlen_q * group, sequences, varlen, batch, heads_kv, "BLOCK_M")](
        *tensors, dq, *_strides(dq), lse, delta, *_strides(lse), *scalars, **window, **common,
        **_interpreter_blocks(block_d, "dq"))


def _rotary_args(cos, sin, interleaved: bool):
    """The rotary table arguments of the KV-cache kernels (dummies when there is no rotary)."""
    if cos is None:
        return dict(COS=None, SIN=None, stride_cos=0, stride_sin=0, table_len=0, rotary_half=0,
                    ROTARY=False, INTERLEAVED=False)
    return dict(COS=cos, SIN=sin, stride_cos=cos.stride(0), stride_sin=sin.stride(0), table_len=cos.shape[0],
                rotary_half=cos.shape[1], ROTARY=True, INTERLEAVED=bool(interleaved))


def _paged_args(k_cache, block_table):
    """(capacity, kernel arguments) of a cache: contiguous (B, S_max, H, D), or pages
    (num_pages, page_size, H, D) with a block table (B, max_blocks)."""
    if block_table is None:
        return k_cache.shape[1], dict(BLOCK_TABLE=k_cache, stride_table=0, num_pages=0, PAGE_SIZE=0)
    page_size = k_cache.shape[1]
    return block_table.shape[1] * page_size, dict(BLOCK_TABLE=block_table, stride_table=block_table.stride(0),
                                                  num_pages=k_cache.shape[0], PAGE_SIZE=page_size)


def _fp8_format(dtype) -> tuple:
    """The append kernel's rounding constants for an fp8 cache dtype: (mantissa bits, exponent
    of the smallest normal, largest finite value); (0, 0, 0.0) for other caches."""
    if dtype not in FP8_CACHE_DTYPES:
        return 0, 0, 0.0
    info = torch.finfo(dtype)
    return round(-math.log2(info.eps)), round(math.log2(info.tiny)), info.max


def _scale_args(k_cache, k_scale, v_scale):
    """The KV-cache kernels' scale arguments: fp8 caches read ``k_scale`` / ``v_scale`` (fp32
    tensors of one value, stride 0, or one per KV head); other caches none (dummies)."""
    if k_cache.dtype not in FP8_CACHE_DTYPES:
        return dict(K_SCALE=k_cache, V_SCALE=k_cache, stride_k_scale=0, stride_v_scale=0)
    if k_scale is None or v_scale is None:
        raise ValueError(f"fp8 caches ({k_cache.dtype}) need k_scale and v_scale tensors (ops.attention passes "
                         f"ones for scales left out)")
    return dict(K_SCALE=k_scale, V_SCALE=v_scale, stride_k_scale=int(k_scale.numel() > 1),
                stride_v_scale=int(v_scale.numel() > 1))


@on_the_tensors_device
def kvcache_append(k, v, k_cache, v_cache, cache_seqlens, rotary_cos, rotary_sin, rotary_interleaved: bool,
                   block_table=None, k_scale=None, v_scale=None) -> None:
    """k_cache[b, cache_seqlens[b] + i] = k[b, i] (rotated at that position when the tables are
    given), v_cache likewise from v; k, v (B, Snew, H, D), caches (B, S_max, H, D), or pages
    (num_pages, page_size, H, D) with ``block_table`` (B, max_blocks) int32. One launch. fp8
    caches store each entry divided by ``k_scale`` / ``v_scale`` (contiguous fp32 tensors of 1
    or H values), rounded as reference.quantize_fp8."""
    batch, new_tokens, heads, head_dim = k.shape
    if k.numel() == 0:
        return
    if batch > MAX_GRID_YZ:  # the grid's batch axis: a launch per slice
        for rows in batch_slices(batch):
            caches = (k_cache, v_cache) if block_table is not None else (k_cache[rows], v_cache[rows])
            kvcache_append(k[rows], v[rows], *caches, cache_seqlens[rows], rotary_cos, rotary_sin, rotary_interleaved,
                           block_table=None if block_table is None else block_table[rows], k_scale=k_scale,
                           v_scale=v_scale)
        return
    capacity, paged = _paged_args(k_cache, block_table)
    mantissa_bits, min_exponent, largest = _fp8_format(k_cache.dtype)
    _kvcache_append_kernel[(new_tokens, batch, 2 * heads)](
        k, *_strides(k), v, *_strides(v), k_cache, *_strides(k_cache), v_cache, *_strides(v_cache),
        cache_seqlens, capacity, heads, **_rotary_args(rotary_cos, rotary_sin, rotary_interleaved), **paged,
        **_scale_args(k_cache, k_scale, v_scale),
        HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim),
        FP8_MANTISSA_BITS=mantissa_bits, FP8_MIN_EXPONENT=min_exponent, FP8_LARGEST=largest,
    )


@on_the_tensors_device
def attention_decode(q, k_cache, v_cache, out, cache_seqlens, new_tokens: int, softmax_scale: float, causal: bool,
                     window_size, rotary_cos, rotary_sin, rotary_interleaved: bool, block_table=None, k_scale=None,
                     v_scale=None) -> None:
    """Split-KV attention of q (B, Sq, Hq, D) over caches (B, S_max, Hkv, D), or pages with
    ``block_table`` (as kvcache_append), holding cache_seqlens[b] + new_tokens valid entries;
    writes out (B, Sq, Hq, D). With the rotary tables, q rotates as it loads (position
    cache_seqlens[b] + s). fp8 caches read as entry x ``k_scale`` / ``v_scale`` (as
    kvcache_append)."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = k_cache.shape[2]
    capacity = _paged_args(k_cache, block_table)[0]
    group = heads_q // heads_kv
    rows = seqlen_q * group
    part_o, part_lse, _ = _decode_partials(q, k_cache, v_cache, cache_seqlens, new_tokens, softmax_scale, causal,
                                           window_size, rotary_cos, rotary_sin, rotary_interleaved, block_table,
                                           k_scale, v_scale)
    splits, rows_padded, block_d = part_o.shape[2:]
    _attn_decode_combine_kernel[(rows * batch * heads_kv,)](
        part_o, part_lse, out, *_strides(out), cache_seqlens, heads_kv, new_tokens, capacity, splits, rows,
        rows_padded,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SPLITS=min(16, next_power_of_2(splits)),
    )


def _decode_partials(q, k_cache, v_cache, cache_seqlens, new_tokens: int, softmax_scale: float, causal: bool,
                     window_size, rotary_cos, rotary_sin, rotary_interleaved: bool, block_table, k_scale=None,
                     v_scale=None):
    """The split kernel of attention_decode: (partial outputs (B, Hkv, splits, rows_padded,
    BLOCK_D), their log2-sum-exp (B, Hkv, splits, rows_padded), BLOCK_N), each split's
    output normalised by its own sum (lse -inf where the split saw no key)."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = k_cache.shape[2]
    capacity, paged = _paged_args(k_cache, block_table)
    group = heads_q // heads_kv
    rows = seqlen_q * group
    block_m = max(16, min(64, next_power_of_2(rows)))
    block_d = max(16, next_power_of_2(head_dim))
    # (BLOCK_N, warps): K and V tiles of BLOCK_N x D; larger heads take narrower tiles and more
    # warps so they stay in registers.
    block_n, warps = (16, 4) if INTERPRETER else (64, 4) if block_d <= 64 else (64, 8) if block_d <= 128 else (32, 8)
    tiles = cdiv(rows, block_m)
    if tiles > MAX_GRID_YZ:  # the row tiles ride on the grid's y axis (below)
        raise ValueError(f"attention_decode: at most {MAX_GRID_YZ * block_m} query rows (positions x group) per "
                         f"call, got {rows} (use flash_attention for long prefills)")
    # Enough programs to fill the GPU twice over, at most one split per 4 key blocks of the
    # capacity. Counted from the capacity (host-known), not the lengths (device), so CUDA
    # graphs replay; each program takes its share of the key blocks its sequence has.
    sms = num_sms(q.device.index or 0) if q.device.type == "cuda" else 2
    max_splits = max(1, cdiv(capacity, 4 * block_n))
    splits = max(1, min(max_splits, cdiv(2 * sms, batch * heads_kv * tiles), 128))
    rows_padded = tiles * block_m
    part_o = torch.empty((batch, heads_kv, splits, rows_padded, block_d), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((batch, heads_kv, splits, rows_padded), device=q.device, dtype=torch.float32)
    window, has_left, has_right = _mask_args(causal, window_size)
    # Batch and KV heads ride on the grid's x axis (up to 2^31 - 1 programs; y and z stop at
    # 65535, which B x Hkv passes from a batch of 2048 at 32 KV heads). The row tiles stay on
    # y: flattened into x as well, the kernel's division by their count made ptxas put 16 B
    # of the d = 128 kernel on the stack (sm_90).
    _attn_decode_split_kernel[(batch * heads_kv, tiles, splits)](
        q, *_strides(q), k_cache, *_strides(k_cache), v_cache, *_strides(v_cache), part_o, part_lse,
        cache_seqlens, heads_kv, seqlen_q, new_tokens, capacity, splits, rows_padded,
        softmax_scale * LOG2E.value, **window, **_rotary_args(rotary_cos, rotary_sin, rotary_interleaved), **paged,
        **_scale_args(k_cache, k_scale, v_scale),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, HAS_LEFT=has_left, HAS_RIGHT=has_right,
        WIDE_ROWS=_wide_rows(group, q), BLOCK_M=block_m, BLOCK_N=block_n,
        SCALED_CACHE=k_cache.dtype in FP8_CACHE_DTYPES, num_warps=warps,
    )
    return part_o, part_lse, block_n


