"""Launch grids stay inside the hardware's limits: x below 2^31, y and z at most 65535.

A batch past 65535 rows, or a decode batch whose (batch row, KV head) pairs pass 65535 (a
batch of 2048 at 32 KV heads), must run, not fail to launch. The CPU interpreter enforces no
grid limit, so these tests record the grids the Triton launchers ask for instead of running
the kernels; the GPU tests in test_attention.py and test_rotary.py run such calls for real,
on both backends.
"""

from __future__ import annotations

import pytest
import torch

from internlm_kernels.ops._kernels import CUDA_MAX_BATCH_ROWS
from internlm_kernels.triton import attention, rotary
from internlm_kernels.triton._host import MAX_GRID_YZ

ROWS_PAST_THE_LIMIT = MAX_GRID_YZ + 5


class GridRecorder:
    """Stands in for Triton kernels: ``kernel[grid](*args, **meta)`` records the kernel's name,
    the grid (x, y, z) and the arguments by name."""

    def __init__(self, monkeypatch, module, names):
        self.launches = []
        for name in names:
            monkeypatch.setattr(module, name, self._kernel(name, getattr(module, name).arg_names))

    def _kernel(self, name, arg_names):
        recorder = self

        class Kernel:
            def __getitem__(self, grid):
                def launch(*args, **meta):
                    shape = tuple(grid(meta) if callable(grid) else grid)
                    recorder.launches.append((name, shape + (1,) * (3 - len(shape)),
                                              {**dict(zip(arg_names, args)), **meta}))
                return launch
        return Kernel()

    def check_limits(self):
        assert self.launches
        for name, (x, y, z), _ in self.launches:
            assert 0 < x < 2**31 and 0 < y <= MAX_GRID_YZ and 0 < z <= MAX_GRID_YZ, (name, (x, y, z))

    def batch_rows(self, name):
        """Rows of the first tensor argument of each launch of ``name``, and where each starts."""
        firsts = [next(iter(args.values())) for kernel, _, args in self.launches if kernel == name]
        return [(t.shape[0], t.storage_offset() // t.stride(0)) for t in firsts]


def _covers(pieces, batch):
    """The launches' batch slices tile range(batch) in order, none past the limit."""
    assert [start for _, start in pieces] == list(range(0, batch, MAX_GRID_YZ))
    assert sum(rows for rows, _ in pieces) == batch and all(rows <= MAX_GRID_YZ for rows, _ in pieces)


def _bf16(*shape):
    return torch.randn(*shape, dtype=torch.bfloat16)


def test_attention_batch_past_the_grid_limit(monkeypatch):
    recorder = GridRecorder(monkeypatch, attention,
                            ["_fwd", "_dkdv", "_dq", "_attn_bwd_delta_kernel"])
    batch = ROWS_PAST_THE_LIMIT
    q, k, v, out, dout = _bf16(batch, 2, 2, 16), _bf16(batch, 2, 1, 16), _bf16(batch, 2, 1, 16), \
        _bf16(batch, 2, 2, 16), _bf16(batch, 2, 2, 16)
    lse = torch.randn(batch, 2, 2)
    attention.attention_fwd(q, k, v, out, lse, None, None, 0.25, True, (-1, -1))
    attention.attention_bwd(dout, q, k, v, out, lse, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                            None, None, 0.25, True, (-1, -1))
    recorder.check_limits()
    for kernel in ("_fwd", "_dkdv", "_dq", "_attn_bwd_delta_kernel"):
        _covers(recorder.batch_rows(kernel), batch)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16_cache", "fp8_cache"])
def test_kvcache_batch_past_the_grid_limit(monkeypatch, fp8):
    recorder = GridRecorder(monkeypatch, attention, ["_kvcache_append_kernel"])
    batch = ROWS_PAST_THE_LIMIT
    k, v = _bf16(batch, 1, 1, 16), _bf16(batch, 1, 1, 16)
    k_cache, v_cache = _bf16(batch, 4, 1, 16), _bf16(batch, 4, 1, 16)
    scales = {}
    if fp8:  # every slice's launch takes the scales (an fp8 launch without them raises)
        k_cache, v_cache = k_cache.to(torch.float8_e5m2), v_cache.to(torch.float8_e5m2)
        scales = {"k_scale": torch.ones(1), "v_scale": torch.ones(1)}
    lengths = torch.zeros(batch, dtype=torch.int32)
    attention.kvcache_append(k, v, k_cache, v_cache, lengths, None, None, False, **scales)
    recorder.check_limits()
    _covers(recorder.batch_rows("_kvcache_append_kernel"), batch)


@pytest.mark.parametrize("queries", [1, 40])
def test_decode_batch_times_heads_past_the_grid_limit(monkeypatch, queries):
    """2048 sequences x 32 KV heads (an MHA model's decode batch): 65536 pairs."""
    recorder = GridRecorder(monkeypatch, attention, ["_attn_decode_split_kernel", "_attn_decode_combine_kernel"])
    batch, heads = 2048, 32
    q = _bf16(batch, queries, heads, 16)
    k_cache, v_cache = _bf16(batch, 64, heads, 16), _bf16(batch, 64, heads, 16)
    lengths = torch.full((batch,), 64 - queries, dtype=torch.int32)
    attention.attention_decode(q, k_cache, v_cache, torch.empty_like(q), lengths, 0, 0.25, True, (-1, -1),
                               None, None, False)
    recorder.check_limits()
    (_, (pairs, tiles, splits), split_args), (_, (rows, _, _), combine_args) = recorder.launches
    assert tiles == -(-queries // split_args["BLOCK_M"])  # a query head per KV head (group of 1)
    assert pairs == batch * heads and rows == queries * batch * heads
    assert split_args["splits"] == combine_args["splits"] == splits  # the kernels' split count is the grid's
    assert split_args["rows_padded"] == tiles * split_args["BLOCK_M"] and combine_args["rows"] == queries


def test_rotary_batch_past_the_grid_limit(monkeypatch):
    recorder = GridRecorder(monkeypatch, rotary, ["_rotary_kernel"])
    batch = ROWS_PAST_THE_LIMIT
    q, k = _bf16(batch, 1, 2, 16), _bf16(batch, 1, 1, 16)
    cos, sin = torch.randn(8, 8), torch.randn(8, 8)
    positions = torch.randint(0, 8, (batch, 1))
    rotary.rotary(q, k, torch.empty_like(q), torch.empty_like(k), cos, sin, positions, None, 0, None,
                  False, False, False)
    recorder.check_limits()
    _covers(recorder.batch_rows("_rotary_kernel"), batch)
    # each slice reads its own rows' positions
    assert [args["POSITION_IDS"].storage_offset() for _, _, args in recorder.launches] == [0, MAX_GRID_YZ]


def test_auto_gives_batches_past_the_limit_to_triton():
    """The CUDA kernels keep the batch on the grid's y axis: past the limit, "cuda" says why and
    "auto" takes Triton."""
    from internlm_kernels.ops.attention import _kernel_limits

    q = _bf16(CUDA_MAX_BATCH_ROWS + 1, 1, 2, 64)
    reason = _kernel_limits("flash_attention", q)("cuda")
    assert reason is not None and "65535 batch rows" in reason and "triton serves more" in reason
    assert _kernel_limits("flash_attention", q)("triton") is None
    assert "batch rows" not in (_kernel_limits("flash_attention", q[:CUDA_MAX_BATCH_ROWS])("cuda") or "")
