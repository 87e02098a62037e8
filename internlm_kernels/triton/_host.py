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


def on_the_tensors_device(launcher):
    """Triton launches on the current CUDA device, with its stream, whatever device the
    tensors are on: a launcher so wrapped makes its first argument's device current for the
    call when it is another (as the CUDA glue does). Otherwise a call on cuda:1 from a thread
    whose current device is cuda:0 ran its kernel on cuda:0 with cuda:1's pointers."""
    @functools.wraps(launcher)
    def launch(first, *args, **kwargs):
        device = first.device
        if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return launcher(first, *args, **kwargs)
        return launcher(first, *args, **kwargs)
    return launch


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
