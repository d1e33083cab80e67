"""Counting host synchronizations: is a call safe for ``torch.compile`` and CUDA graphs?

A *host synchronization* makes the CPU wait for the device. Two kinds of ops cause one:

- *scalar reads*: a value copied to Python (``t.item()``, ``bool(t)``, ``int(t)``,
  ``if t:``, ``torch.equal``; all ops tagged ``torch.Tag.data_dependent_output``, at the
  dispatcher mostly ``aten._local_scalar_dense``);
- *dynamic shapes*: an output whose size depends on the data (``nonzero``, boolean-mask
  indexing ``x[mask]``, ``masked_select``, ``unique``, ``bincount``; ops tagged
  ``torch.Tag.dynamic_output_shape``; integer indexing ``x[idx]`` is not one).

On a GPU each one stalls the stream and makes CUDA-graph capture fail; under
``torch.compile`` each one breaks the graph (``fullgraph=True`` fails). Device-side
checks (``torch._assert_async``) are neither. :class:`SyncCounter` counts both kinds at
the dispatcher, whatever the device, so a CPU test sees what would synchronize on a GPU::

    with SyncCounter() as syncs:
        model.early_exit(ids, exit_layer=2, threshold=0.5, capacity=64)
    assert syncs.total == 0, syncs.ops

``torch.compile`` does not run while a dispatch mode is active; to count inside a
compiled function, compile it with ``backend=counting_backend(syncs)`` instead: it
runs the forward and backward graphs that AOTAutograd traces (aten ops, eager kernels,
like ``backend="aot_eager"``) under ``syncs``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncCounter", "counting_backend"]


def _sync_kind(func: torch._ops.OpOverload, args: tuple) -> str | None:
    """``"scalar_read"``, ``"dynamic_shape"`` or ``None`` (no host synchronization) for a
    call of the aten op ``func`` on ``args``."""
    if torch.Tag.data_dependent_output in func.tags:
        return "scalar_read"
    if torch.Tag.dynamic_output_shape not in func.tags:
        return None
    if func is torch.ops.aten.index.Tensor:  # data-dependent only with a boolean mask
        masks = [i for i in args[1] if i is not None and i.dtype in (torch.bool, torch.uint8)]
        return "dynamic_shape" if masks else None
    return "dynamic_shape"


class SyncCounter(TorchDispatchMode):
    """A dispatch mode that counts the ops which synchronize the host with the device.

    Attributes (accumulated over every ``with`` block of this counter):
    ``scalar_reads`` and ``dynamic_shapes``, the number of calls of each kind (see the
    module docstring); ``ops``, a ``collections.Counter`` of those calls by op name
    (``"aten._local_scalar_dense.default"``, ``"aten.nonzero.default"``, ...);
    ``total``, both kinds together. Ops run unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scalar_reads = 0
        self.dynamic_shapes = 0
        self.ops: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        """Scalar reads plus dynamic-shape ops."""
        return self.scalar_reads + self.dynamic_shapes

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: tuple,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kind = _sync_kind(func, args)
        if kind == "scalar_read":
            self.scalar_reads += 1
        elif kind == "dynamic_shape":
            self.dynamic_shapes += 1
        if kind is not None:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def counting_backend(counter: SyncCounter) -> Callable:
    """A ``torch.compile`` backend that runs the traced forward and backward graphs
    (aten ops, eagerly, as ``backend="aot_eager"``) with ``counter`` active, so that it
    counts the synchronizations inside the compiled code. Use it with
    ``fullgraph=True``: code outside the graphs (a graph break) is not counted."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def compiler(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable:
        def run(*args: Any) -> Any:
            with counter:
                return graph(*args)

        return make_boxed_func(run)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)
