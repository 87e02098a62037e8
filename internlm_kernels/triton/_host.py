"""The launchers' host-side helpers: integer arithmetic and device facts.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions (usable inside
kernels), and each host call goes through Triton's constexpr wrapper: about 1.5 us, against
0.02 us for the arithmetic (triton 3.6 and 3.8, measured on the CI machine). A launch made a
few of them, a few microseconds of every call's host time. Kernels keep Triton's own.
Device facts are asked once per device.
"""

import functools

import torch


# The grid's y and z axes stop at 65535 programs (x at 2^31 - 1). Launchers that put the
# batch on y launch a larger batch in slices of at most this many rows.
MAX_GRID_YZ = 65535


def batch_slices(batch: int):
    """Slices of at most MAX_GRID_YZ rows that cover range(batch), in order."""
    return [slice(start, min(start + MAX_GRID_YZ, batch)) for start in range(0, batch, MAX_GRID_YZ)]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def capability_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


@functools.lru_cache(maxsize=None)
def max_shared_per_block(device_index: int) -> int:
    """Bytes of shared memory a block may opt in to on this device."""
    limit = getattr(torch.cuda.get_device_properties(device_index), "shared_memory_per_block_optin", None)
    if limit is None:  # older torch: ask Triton's driver
        import triton

        limit = triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    return int(limit)
