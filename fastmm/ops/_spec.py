"""One declaration per kernel, from which the ops layer derives everything else about it.

A family's ops module declares each kernel its backends implement by writing the kernel's fake (its output
shapes) under ``kernel_op``::

    @kernel_op("routed_linear", "routed_linear", checks=(ids_below("modality", "weight", label="M"),))
    def routed_linear_fwd(x: Tensor, modality: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return x.new_empty(x.shape[0], weight.shape[1])

The declaration is then the kernel, callable with the kernel's arguments, and from it come:

- the custom op ``torch.ops.fastmm.<name>`` (name defaults to the op's), its schema read from the annotations.
  Its body runs ``<backend module>.<kernel>`` (the decorated function's name) of the backend chosen for the op
  on the first tensor argument's device; a backend that leaves out a kernel declared ``optional`` runs the
  reference's. An output annotated ``Optional[Tensor]`` crosses the op as a [0] tensor,
  since custom ops cannot return None, and comes back as None;
- the fake kernel: the decorated function itself;
- value checks (``checks``), run at every call before either path: ids in range, finite values. They read
  values on the host for CPU tensors, assert on the device for CUDA ones and are skipped while tracing
  (fastmm._validate.value_check_mode);
- the eager bypass: the call runs the backend's kernel directly, skipping the dispatcher's tens of
  microseconds (they matter for batch-1 decode), unless the custom op is needed: under torch.compile, while a
  dispatch mode traces or fakes tensors (export, AOTAutograd's backward), or when autograd must record (the
  declaration has a backward, grad is enabled and a tensor argument requires grad);
- autograd: ``register_autograd(backward, setup_context=...)``, as on a custom op;
- ``writes_out=True``: the kernel takes a last argument ``out`` (a buffer to write the result into, or None); the
  call accepts ``out=`` and the dispatcher path, whose op returns a new tensor, copies into it.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from fastmm import _validate as v
from fastmm.ops._dispatch import kernel_function

Tensor = torch.Tensor

# family -> its declared kernels, in declaration order: the family's kernel interface, which
# tests/test_kernel_interfaces.py holds every backend module to.
DECLARED: dict[str, list["KernelOp"]] = {}


# ------------------------------------------------------------------------------------------- value checks


@dataclass(frozen=True)
class _IdsBelow:
    ids: str
    bound: str
    dim: int
    label: str

    def __call__(self, op: str, arguments: dict[str, Any]) -> None:
        upper = arguments[self.bound].shape[self.dim]
        where = f"{self.bound}.shape[{self.dim}]"
        v.check_id_range(op, self.ids, arguments[self.ids], upper, f"{self.label} = {where}" if self.label else where)


@dataclass(frozen=True)
class _Finite:
    name: str

    def __call__(self, op: str, arguments: dict[str, Any]) -> None:
        v.check_finite(op, self.name, arguments[self.name])


def ids_below(ids: str, bound: str, dim: int = 0, label: str = "") -> _IdsBelow:
    """Every value of the argument ``ids`` lies in [0, <argument bound>.shape[dim])."""
    return _IdsBelow(ids, bound, dim, label)


def finite(name: str) -> _Finite:
    """The argument ``name`` holds no NaN or inf."""
    return _Finite(name)


# ------------------------------------------------------------------------------------------ the declaration


def _is_optional_tensor(annotation: object) -> bool:
    return typing.get_origin(annotation) is typing.Union and set(typing.get_args(annotation)) == {Tensor, type(None)}


class KernelOp:
    """A declared kernel (see the module docstring). Call it with the kernel's arguments."""

    def __init__(
        self,
        family: str,
        op: str,
        fake: Callable[..., Any],
        name: str,
        checks: Sequence[Callable[[str, dict[str, Any]], None]],
        writes_out: bool,
        optional: bool,
    ):
        self.family, self.op, self.kernel, self.optional = family, op, fake.__name__, optional
        self._fake, self._checks, self._writes_out = fake, tuple(checks), writes_out
        self._trains = False
        hints = typing.get_type_hints(fake)
        signature = inspect.signature(fake)
        params = [p.replace(annotation=hints[p.name]) for p in signature.parameters.values()]
        self._names = tuple(p.name for p in params)
        tensor_params = [i for i, p in enumerate(params) if p.annotation is Tensor]
        if not tensor_params:
            raise TypeError(f"kernel_op {self.kernel}: needs a Tensor argument to choose the device by")
        self._device_arg = tensor_params[0]
        self._tensor_args = tuple(i for i, p in enumerate(params) if p.annotation is Tensor or _is_optional_tensor(p.annotation))
        returns = hints["return"]
        self._multiple = typing.get_origin(returns) is tuple
        outputs = typing.get_args(returns) if self._multiple else (returns,)
        self._optional_outputs = tuple(_is_optional_tensor(o) for o in outputs)
        schema_returns: Any = tuple[tuple(Tensor for _ in outputs)] if self._multiple else Tensor
        self._signature = inspect.Signature(params, return_annotation=schema_returns)
        self._op = self._register(name)
        DECLARED.setdefault(family, []).append(self)

    # -- the custom op ---------------------------------------------------------------------------------------

    def _register(self, name: str):
        signature = self._signature

        def run_kernel(*args: Any, **kwargs: Any) -> Any:
            args = signature.bind(*args, **kwargs).args
            result = self._kernel(args)(*args, None) if self._writes_out else self._kernel(args)(*args)
            return self._to_schema(args, result, check=True)

        def fake(*args: Any, **kwargs: Any) -> Any:
            args = signature.bind(*args, **kwargs).args
            return self._to_schema(args, self._fake(*args), check=False)

        run_kernel.__signature__ = signature  # type: ignore[attr-defined]
        run_kernel.__name__ = self.kernel
        custom_op = torch.library.custom_op(f"fastmm::{name}", run_kernel, mutates_args=())
        custom_op.register_fake(fake)
        return custom_op

    def _kernel(self, args: tuple) -> Callable[..., Any]:
        return kernel_function(self.family, self.op, self.kernel, args[self._device_arg].device)

    def _to_schema(self, args: tuple, result: Any, check: bool) -> Any:
        """The kernel's result as the op returns it: an absent optional output as a [0] tensor."""
        if not any(self._optional_outputs):
            return result
        outputs = list(result) if self._multiple else [result]
        for i, optional in enumerate(self._optional_outputs):
            if not optional:
                continue
            if outputs[i] is None:
                outputs[i] = args[self._device_arg].new_empty(0)
            elif check and outputs[i].shape == (0,):
                raise RuntimeError(f"{self.kernel}: optional output {i} is a [0] tensor, which reads as absent")
        return tuple(outputs) if self._multiple else outputs[0]

    def _from_schema(self, result: Any) -> Any:
        if not any(self._optional_outputs):
            return result
        outputs = list(result) if self._multiple else [result]
        for i, optional in enumerate(self._optional_outputs):
            if optional and outputs[i].shape == (0,):
                outputs[i] = None
        return tuple(outputs) if self._multiple else outputs[0]

    @property
    def parameters(self) -> tuple[str, ...]:
        """The kernel's parameter names as every backend module declares them (``out`` last if it writes one)."""
        return self._names + (("out",) if self._writes_out else ())

    @property
    def custom_op(self):
        """The registered ``torch.ops.fastmm.<name>`` (opcheck it; call the declaration itself otherwise)."""
        return self._op

    def register_autograd(self, backward: Callable[..., Any], *, setup_context: Callable[..., Any]) -> None:
        """As torch.library's: the backward of the custom op, which calls through it from then on when
        autograd records."""
        self._op.register_autograd(backward, setup_context=setup_context)
        self._trains = True

    # -- the call ----------------------------------------------------------------------------------------------

    def _needs_dispatcher(self, args: tuple) -> bool:
        if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
            return True
        if not (self._trains and torch.is_grad_enabled()):
            return False
        return any(args[i] is not None and args[i].requires_grad for i in self._tensor_args)

    def __call__(self, *args: Any, out: Optional[Tensor] = None) -> Any:
        if self._checks:
            arguments = dict(zip(self._names, args))
            for check in self._checks:
                check(self.op, arguments)
        if self._needs_dispatcher(args):
            result = self._from_schema(self._op(*args))
            return result if out is None else out.copy_(result)
        if self._writes_out:
            return self._kernel(args)(*args, out)
        if out is not None:
            raise TypeError(f"{self.kernel}: takes no out buffer")
        return self._kernel(args)(*args)


def kernel_op(
    family: str,
    op: str,
    *,
    name: str | None = None,
    checks: Sequence[Callable[[str, dict[str, Any]], None]] = (),
    writes_out: bool = False,
    optional: bool = False,
) -> Callable[[Callable[..., Any]], KernelOp]:
    """Declare the kernel named like the decorated fake, implemented by every backend module of ``family``
    (fastmm.<backend>.<family>; ``optional``: a backend other than the reference may leave it out) and
    dispatched by the backend chosen for the public op ``op``; registered as ``torch.ops.fastmm.<name>``
    (default: ``op``). See the module docstring."""

    def declare(fake: Callable[..., Any]) -> KernelOp:
        return KernelOp(family, op, fake, name or op, checks, writes_out, optional)

    return declare
