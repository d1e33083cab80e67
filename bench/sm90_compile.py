"""``python -m bench.sm90_compile``: compile every Triton launch of the ops for Hopper, offline.

    python -m bench.sm90_compile [--arch 90] [--out FILE.md]

No GPU needed. The launchers of ``lego_kernels.head``, ``chunked`` and ``routing`` run on meta
tensors (nothing is allocated or executed) at the canonical shapes' sizes, with the GPU's tile
sizes, every dtype, measure and gradient flag, while each kernel is replaced by a recorder; every
distinct launch is then compiled the way the JIT would compile it on an H100/H200 (its own
argument specialization: 16-byte aligned pointers, integers divisible by 16 or equal to 1) with
the installed triton and its bundled ptxas for ``sm_<arch>a``. Reported per launch: registers and
stack per thread (stack > 0: spills), shared memory, which tensor-core instruction the dots
became (``wgmma`` on Hopper; ``-``: no dot) and the widest global loads. Exit status 1 when a
launch does not compile.

This is how the kernels are checked against another triton version without a GPU, e.g. the GPU
machines' 3.6::

    pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36:$PWD python -m bench.sm90_compile
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, and the GPU's tile sizes
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's notice

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from bench.common import SHAPES
from lego_kernels import chunked, head, routing

KERNELS = {
    head: (
        "_norm_fwd_kernel",
        "_norm_bwd_kernel",
        "_stats_kernel",
        "_finish_kernel",
        "_softmax_grad_kernel",
        "_ce_bwd_kernel",
    ),
    routing: (
        "_route_count_kernel",
        "_route_write_kernel",
        "_gather_rows_kernel",
        "_scatter_rows_kernel",
    ),
}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` records the launch."""

    def __init__(self, kernel, launches: list) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.kernel, args, kwargs))

        return launch


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def record_launches() -> list:
    """Every launch the ops make at the canonical shapes (and awkward ones), on meta tensors."""
    launches: list = []
    saved = {}
    for module, names in KERNELS.items():
        for name in names:
            saved[module, name] = getattr(module, name)
            setattr(module, name, Recorder(saved[module, name], launches))
    precision = torch.get_float32_matmul_precision()
    try:
        # float32 twice: IEEE dots ("highest", torch's default) and TF32 ("high")
        for dtype, matmul_precision in (*((d, precision) for d in DTYPES), (torch.float32, "high")):
            torch.set_float32_matmul_precision(matmul_precision)
            for shape in (*(SHAPES[s] for s in ("seed", "gpt2", "llama3")), SHAPES["tiny"]):
                _head_launches(shape.tokens, shape.dim, shape.vocab, dtype)
            _head_launches(100, 100, 1001, dtype)  # D and V not multiples of any block
        _routing_launches()
    finally:
        torch.set_float32_matmul_precision(precision)
        for (module, name), kernel in saved.items():
            setattr(module, name, kernel)
    return launches


def _head_launches(n: int, d: int, v: int, dtype: torch.dtype) -> None:
    x, w = _meta(n, d, dtype=dtype), _meta(v, d, dtype=dtype)
    targets = _meta(n, dtype=torch.int64)
    for norm, nw, nb in (("rms", _meta(d, dtype=dtype), None), ("layer", _meta(d), _meta(d))):
        head._norm_forward(x, nw, nb, norm == "rms", 1e-6)
        for needs in ((True, True, nb is not None), (True, False, False), (False, True, False)):
            head._norm_backward(x, x, nw, nb, _meta(2, n), norm == "rms", needs)
    for measure in range(4):
        head._head_stats(x, w, None, -100, measure)
        head._head_stats(x, w, targets, -100, measure)
        head._head_stats(_meta(n, v, dtype=dtype), None, None, 0, measure)  # confidence_from_logits
        padded = _meta(n, chunked.padded(v), dtype=dtype)
        head._head_stats(padded, None, targets, -1, measure, vocab=v)  # the chunked pass
    head.logits_pass(_meta(n, chunked.padded(v), dtype=dtype), v, targets, None, True)
    lse, coef = _meta(n), _meta(n)
    for needs in ((True, True), (True, False), (False, True)):
        head._ce_backward(x, w, targets, lse, coef, *needs)


def _routing_launches() -> None:
    for dtype in DTYPES:
        conf, x = _meta(8192, dtype=dtype), _meta(8192, 4096, dtype=dtype)
        routing.route(conf, 0.5, 2458)
        routing.route(conf, _meta(), 2458)
        indices = _meta(2458, dtype=torch.int64)
        routing._gather_rows(x, indices)
        routing._scatter_rows_(x, _meta(2458, 4096, dtype=dtype), indices)
        routing._scatter_rows_(x, None, indices)


def compile_launch(kernel, args: tuple, kwargs: dict, target: GPUTarget):
    """Compile one recorded launch as the JIT would for ``target``; returns the kernel."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    return triton.compile(
        ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__
    )


def resources(compiled, tool_dir: str) -> dict[str, int]:
    """Registers, stack and shared memory per thread/block, from cuobjdump on the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [os.path.join(tool_dir, "cuobjdump"), "-res-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED):(\d+)", out))
    return {key.lower(): int(value) for key, value in found.items()}


def _loads(ptx: str) -> str:
    """The widest global loads: ``ld v4`` (16 bytes of 32-bit words), ``cp.async 16 B`` (the
    pipelined copies into shared memory of the dot operands), ``ld scalar``."""
    kinds = []
    copies = re.findall(r"cp\.async\.c[ag]\.shared\.global[^,]*,[^,]*,\s*(0x[0-9a-f]+|\d+)", ptx)
    if copies:
        kinds.append(f"cp.async {max(int(c, 0) for c in copies)} B")
    widths = re.findall(r"ld\.global(?:\.[\w:]+)*?\.v([248])\.", ptx)
    kinds.append(f"ld v{max(map(int, widths))}" if widths else "ld scalar")
    return ", ".join(kinds)


def describe(kernel, kwargs: dict) -> str:
    """The launch's constexpr flags, for the report."""
    flags = [
        f"{p.name}={kwargs[p.name]}"
        for p in kernel.params
        if p.is_constexpr and p.name in kwargs and not p.name.startswith("BLOCK")
    ]
    warps = kwargs.get("num_warps", 4)
    return ", ".join([*flags, f"warps={warps}"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sm90_compile", description=__doc__)
    parser.add_argument("--arch", type=int, default=90, help="compute capability (default 90)")
    parser.add_argument("--out", default=None, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    tool_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    seen, rows, failed = set(), [], 0
    launches = record_launches()
    for kernel, largs, kwargs in launches:
        bound = create_function_from_signature(
            kernel.signature, kernel.params, make_backend(target)
        )(*largs, **kwargs)
        key = (kernel.fn.__name__, str(bound[1]), str(sorted(kwargs.items())))
        if key in seen:
            continue
        seen.add(key)
        name = kernel.fn.__name__
        try:
            compiled = compile_launch(kernel, largs, kwargs, target)
        except Exception as exc:  # report every failure, then fail the run
            failed += 1
            first = str(exc).strip().splitlines()
            rows.append(f"| {name} | {describe(kernel, kwargs)} | FAILED: {first[-1][:120]} |||||")
            continue
        res = resources(compiled, tool_dir)
        ptx = compiled.asm["ptx"]
        mma = "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "-")
        rows.append(
            f"| {name} | {describe(kernel, kwargs)} | {res.get('reg', '?')} "
            f"| {res.get('stack', '?')} | {res.get('shared', '?')} | {mma} | {_loads(ptx)} |"
        )
        print(rows[-1], flush=True)
    lines = [
        f"# Offline compile for sm_{args.arch}a: triton {triton.__version__}, "
        f"torch {torch.__version__}",
        "",
        f"{len(rows)} distinct launches, {failed} failed.",
        "",
        "| kernel | flags | registers | stack (spills) | shared B | dots | widest loads |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    report: Callable[[str], None] = print
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines))
        report(f"sm90_compile: wrote {args.out}")
    report(
        f"sm90_compile: {len(rows)} launches compiled with triton {triton.__version__}, "
        f"{failed} failed"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
