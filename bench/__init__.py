"""Benchmarks of ``lego_kernels``: the pytest-benchmark GPU suite and ``python -m bench.compare``.

- ``bench/test_*.py``: pytest-benchmark tests of every op (skipped without CUDA);
  run them with ``python -m pytest bench``.
- ``bench.compare``: one-process comparison against PyTorch eager, ``torch.compile``,
  Liger-Kernel and Cut Cross-Entropy on the same inputs.
- ``bench.common``: canonical shapes, inputs, FLOP and byte counts, timers, machine info.
- ``bench.peers``: the functions the peers run (eager PyTorch, Liger, CCE).
"""
