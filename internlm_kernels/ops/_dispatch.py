"""Kernel launchers as torch.library custom ops, with an eager fast path.

The custom op (``torch.ops.internlm_kernels.<name>``, fake and autograd implementations
registered) is what torch.compile traces without graph breaks, what opcheck checks, and what
tensor subclasses and dispatch modes see. Its Python dispatch, though, costs about as much
as a short kernel runs: on a 2-core CPU ``ik.rms_norm``'s host path took 105 us per call
with the launch stubbed out, half of it in torch.library. So the package's ops call a
``KernelOp``: outside tracing, with plain tensors and no dispatch mode active, it runs the
implementation itself (inside a torch.autograd.Function with the same setup_context and
backward when gradients flow), bumping the version counters of the tensors it mutates as
the dispatcher would; otherwise it calls the custom op.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

# Tensors the fast path takes: anything else (FakeTensor, FunctionalTensor, DTensor, ...)
# goes through the dispatcher.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_call(args: Sequence[object]) -> bool:
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return all(type(a) in _PLAIN_TENSOR_TYPES for a in args if isinstance(a, torch.Tensor))


class KernelOp:
    """``internlm_kernels::<name>`` registered from ``impl``; calling it takes the fast path
    when it can (module docstring). ``register_fake`` and ``register_autograd`` register on
    the custom op, as torch.library's CustomOpDef methods do."""

    def __init__(self, name: str, impl: Callable, mutates_args: Sequence[str]):
        self.impl = impl
        self.op = torch.library.custom_op(f"internlm_kernels::{name}", mutates_args=tuple(mutates_args))(impl)
        parameters = list(inspect.signature(impl).parameters)
        self._mutated = [parameters.index(name) for name in mutates_args]
        self._function = None

    def register_fake(self, fn: Callable) -> Callable:
        return self.op.register_fake(fn)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                output = impl(*args)
                setup_context(ctx, args, output)
                return output

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        self._function = Function

    def __call__(self, *args):
        needs_grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        if not _plain_call(args) or (needs_grad and self._function is None):
            return self.op(*args)  # (an op without autograd raises there as it always did)
        if needs_grad:
            return self._function.apply(*args)
        output = self.impl(*args)
        for index in self._mutated:
            if args[index] is not None:
                torch.autograd.graph.increment_version(args[index])
        return output


def kernel_op(name: str, *, mutates_args: Sequence[str] = ()) -> Callable[[Callable], KernelOp]:
    """Decorator: ``@kernel_op("rms_norm_fwd")`` over the implementation (typed, as
    torch.library.custom_op requires)."""
    return lambda impl: KernelOp(name, impl, mutates_args)
