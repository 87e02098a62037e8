"""Integer helpers for the launchers' host-side arithmetic.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions (usable inside
kernels), and each host call goes through Triton's constexpr wrapper: about 1.5 us, against
0.02 us for the arithmetic (triton 3.6 and 3.8, measured on the CI machine). A launch made a
few of them, a few microseconds of every call's host time. Kernels keep Triton's own.
"""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
