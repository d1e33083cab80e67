"""lego-kernels: Triton kernels for early-exit Transformers.

The public API is the functional module :mod:`lego_kernels.ops`;
:mod:`lego_kernels.reference` holds the plain-PyTorch spec of every op.
"""

from lego_kernels import ops, reference

__version__ = "0.1.0"
__all__ = ["ops", "reference"]
