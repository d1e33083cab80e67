"""Routing ops (route, gather_tokens, scatter_tokens) against textbook PyTorch.

References: ``torch.nonzero`` of the hard mask (padded with -1 / cut to the capacity)
for ``route``; ``index_select`` and ``index_copy`` for ``gather_tokens`` and
``scatter_tokens`` and their gradients (autograd through those ops). Gather and scatter
copy rows, so the tolerance is zero for every dtype (float32, bfloat16, float16): results
and gradients must be bit-identical.

Each op runs on two backends: ``"kernel"`` (the Triton kernels; through the interpreter
on CPU, natively with ``LEGO_TEST_CUDA=1`` on a GPU) and ``"torch"`` (the reference, via
``ops.use_backend("torch")``). The tests marked ``cuda`` check CUDA graphs,
``torch.compile`` and the absence of host synchronizations on a GPU.
"""

import contextlib
import os

import pytest
import torch

from lego_kernels import ops
from lego_kernels.ops import RoutePlan

ON_CUDA = os.environ.get("LEGO_TEST_CUDA") == "1" and torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["kernel", "torch"]
needs_cuda = pytest.mark.skipif(
    not ON_CUDA, reason="needs a CUDA GPU and LEGO_TEST_CUDA=1 (CUDA graphs, compile, syncs)"
)


def use(backend: str) -> contextlib.AbstractContextManager:
    """Run the ops on ``backend``: the Triton kernels or the torch reference."""
    if backend == "torch":
        return ops.use_backend("torch")
    if ops.backend(torch.empty(0, device=DEVICE)) == "torch":
        pytest.skip("Triton kernels unavailable: set TRITON_INTERPRET=1 or run on a GPU")
    return contextlib.nullcontext()


def expected_indices(confidence, threshold, capacity):
    """Textbook plan: nonzero of ``not (confidence >= threshold)`` in float32, padded or cut."""
    hard = ~(confidence.float().reshape(-1) >= threshold)
    indices = torch.nonzero(hard).squeeze(1)
    if capacity is not None:
        padded = torch.full((capacity,), -1, dtype=torch.int64, device=indices.device)
        kept = min(capacity, indices.numel())
        padded[:kept] = indices[:kept]
        indices = padded
    return indices, int(hard.sum())


def random_plan(num_tokens, capacity=None, hard_share=0.5):
    """A RoutePlan over ``num_tokens`` tokens built by the reference ``route``."""
    confidence = torch.rand(num_tokens, device=DEVICE)
    with ops.use_backend("torch"):
        return ops.route(confidence, hard_share, capacity=capacity)


# ----------------------------------------------------------------------------- route


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tokens", [0, 1, 37, 2500])
@pytest.mark.parametrize("threshold", [0.0, 0.4, 1.5])  # K = 0, some, K = N
@pytest.mark.parametrize("capacity", [None, 0, 5, 4000])
def test_route_matches_nonzero(backend, num_tokens, threshold, capacity):
    confidence = torch.rand(num_tokens, device=DEVICE)
    confidence[::11] = float("nan")  # NaN confidence is hard: it never exits
    with use(backend):
        plan = ops.route(confidence, threshold, capacity=capacity)
    indices, count = expected_indices(confidence, threshold, capacity)
    assert isinstance(plan, RoutePlan) and plan.num_tokens == num_tokens
    assert plan.indices.dtype == torch.int64 and plan.indices.device == confidence.device
    assert torch.equal(plan.indices, indices)
    assert plan.count.dtype == torch.int64 and plan.count.shape == ()
    assert plan.count.device == confidence.device and int(plan.count) == count


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_route_dtypes_leading_dims_and_threshold_tensor(backend, dtype):
    confidence = torch.rand(3, 5, 7, device=DEVICE).to(dtype)
    threshold = float(confidence.flatten()[10])  # ties: confidence == threshold exits
    with use(backend):
        plans = [
            ops.route(confidence, threshold, capacity=60),
            ops.route(
                confidence, torch.tensor(threshold, dtype=torch.float64, device=DEVICE), capacity=60
            ),
            ops.route(confidence, torch.tensor(threshold), capacity=60),  # CPU tensor
        ]
    indices, count = expected_indices(confidence, threshold, 60)
    assert indices[indices >= 0].tolist().count(10) == 0
    for plan in plans:
        assert torch.equal(plan.indices, indices) and int(plan.count) == count
        assert plan.num_tokens == 105


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_nan_threshold_tensor_makes_every_token_hard(backend):
    """A tensor threshold is never read on the host, so NaN is not caught: no token exits."""
    confidence = torch.rand(9, device=DEVICE)
    with use(backend):
        plan = ops.route(confidence, torch.tensor(float("nan"), device=DEVICE), capacity=9)
    assert plan.indices.tolist() == list(range(9)) and int(plan.count) == 9


def test_route_compares_in_float32():
    # 0.7 rounds to 0.69921875 in bfloat16: compared in bfloat16 the token would exit.
    confidence = torch.tensor([0.69921875, 0.703125], dtype=torch.bfloat16, device=DEVICE)
    for backend in BACKENDS:
        with use(backend):
            assert ops.route(confidence, 0.7).indices.tolist() == [0]


def test_route_kernel_many_blocks_and_capacity_overflow():
    with use("kernel"):
        from lego_kernels import routing  # imports triton: only where the kernels run

        # Several ROUTE_BLOCK blocks, so each program must add up the counts before it.
        confidence = torch.rand(5 * routing.ROUTE_BLOCK + 3, device=DEVICE)
        capacity = 2000  # fewer slots than the ~2600 hard tokens: the first ones win
        plan = ops.route(confidence, 0.5, capacity=capacity)
    indices, count = expected_indices(confidence, 0.5, capacity)
    assert count > capacity and int(plan.count) == count
    assert torch.equal(plan.indices, indices)


# ----------------------------------------------------------------------------- gather


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "capacity", "hard_share"),
    [
        ((2, 9, 37), None, 0.5),  # leading dims, D not a power of two
        ((2, 9, 37), 12, 0.5),  # padding (-1 rows)
        ((2, 9, 37), 4, 0.5),  # capacity overflow
        ((18, 1), None, 0.0),  # K = 0
        ((18, 5000), None, 2.0),  # K = N, D wider than one tile
        ((0, 8), 3, 0.5),  # N = 0: all padding
    ],
)
def test_gather_matches_index_select(backend, dtype, shape, capacity, hard_share, monkeypatch):
    x = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
    plan = random_plan(x.numel() // shape[-1], capacity, hard_share)
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):  # unwritten elements of the output show as NaN
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    with use(backend):
        monkeypatch.setattr(torch, "empty", poisoned_empty)
        out = ops.gather_tokens(x, plan)
        monkeypatch.setattr(torch, "empty", empty)
        grad = torch.randn_like(out)
        (grad_x,) = torch.autograd.grad(out, x, grad)

    rows = x.detach().reshape(-1, shape[-1]).requires_grad_()
    valid = plan.indices >= 0
    ref = torch.zeros(plan.indices.numel(), shape[-1], dtype=dtype, device=DEVICE)
    ref = ref.index_copy(0, valid.nonzero().squeeze(1), rows.index_select(0, plan.indices[valid]))
    (ref_grad,) = torch.autograd.grad(ref, rows, grad)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.equal(out, ref)
    assert torch.equal(grad_x, ref_grad.reshape(shape))


# ----------------------------------------------------------------------------- scatter


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "capacity", "hard_share"),
    [
        ((2, 9, 37), None, 0.5),
        ((2, 9, 37), 12, 0.5),  # padding: src rows at -1 slots are dropped
        ((2, 9, 37), 4, 0.5),  # capacity overflow
        ((18, 1), None, 0.0),  # K = 0: a plain copy
        ((18, 5000), None, 2.0),  # K = N
        ((0, 8), 3, 0.5),  # N = 0
    ],
)
def test_scatter_matches_index_copy(backend, dtype, shape, capacity, hard_share):
    base = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
    plan = random_plan(base.numel() // shape[-1], capacity, hard_share)
    src = torch.randn(plan.indices.numel(), shape[-1], device=DEVICE).to(dtype).requires_grad_()
    base_before = base.detach().clone()
    with use(backend):
        out = ops.scatter_tokens(base, src, plan)
        grad = torch.randn_like(out)
        grad_base, grad_src = torch.autograd.grad(out, (base, src), grad)

    rows = base.reshape(-1, shape[-1])
    valid = plan.indices >= 0
    ref = rows.index_copy(0, plan.indices[valid], src[valid]).reshape(shape)
    ref_grad_base, ref_grad_src = torch.autograd.grad(ref, (base, src), grad)
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out, ref)
    assert torch.equal(base.detach(), base_before)  # out of place
    assert torch.equal(grad_base, ref_grad_base)
    assert torch.equal(grad_src, ref_grad_src)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_grad_to_one_input_only(backend):
    plan = random_plan(12, capacity=8)
    base = torch.randn(12, 6, device=DEVICE)
    src = torch.randn(8, 6, device=DEVICE)
    with use(backend):
        for needs in ((True, False), (False, True)):
            b, s = base.clone().requires_grad_(needs[0]), src.clone().requires_grad_(needs[1])
            ops.scatter_tokens(b, s, plan).sum().backward()
            assert (b.grad is not None) == needs[0] and (s.grad is not None) == needs[1]


def test_kernels_take_strided_inputs():
    """Column-strided, transposed and broadcast (stride 0) inputs and gradients."""
    plan = random_plan(12, capacity=9)
    wide = torch.randn(3, 4, 10, device=DEVICE)
    x = wide[..., ::2]  # column stride 2
    xt = wide[..., :5].transpose(0, 1).contiguous().transpose(0, 1)  # row-strided [3, 4, 5]
    src = torch.randn(5, 9, device=DEVICE).t()  # [9, 5], column stride 9
    grad = torch.ones(1, 1, device=DEVICE).expand(9, 5)  # stride 0
    with ops.use_backend("torch"):
        expected = [ops.gather_tokens(t, plan) for t in (x, xt)]
        expected.append(ops.scatter_tokens(x, src, plan))
    with use("kernel"):
        assert torch.equal(ops.gather_tokens(x, plan), expected[0])
        assert torch.equal(ops.gather_tokens(xt, plan), expected[1])
        assert torch.equal(ops.scatter_tokens(x, src, plan), expected[2])
        leaf = x.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(ops.gather_tokens(leaf, plan), leaf, grad)
    valid = plan.indices >= 0
    assert torch.equal(grad_x.reshape(12, 5)[plan.indices[valid]], grad[valid])
    assert grad_x.sum() == 5 * int(valid.sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    plan = random_plan(5, capacity=4)  # some hard tokens and, likely, a -1 slot
    x = torch.randn(5, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    src = torch.randn(4, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with use(backend):
        assert torch.autograd.gradcheck(lambda t: ops.gather_tokens(t, plan), (x,))
        assert torch.autograd.gradcheck(lambda b, s: ops.scatter_tokens(b, s, plan), (x, src))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_then_scatter_round_trip(backend):
    """The early-exit pattern: hard rows out, transformed, back; exited rows untouched."""
    x = torch.randn(3, 7, 10, device=DEVICE)
    confidence = torch.rand(3, 7, device=DEVICE)
    with use(backend):
        plan = ops.route(confidence, 0.6, capacity=21)
        out = ops.scatter_tokens(x, 2 * ops.gather_tokens(x, plan), plan)
    hard = (confidence < 0.6).unsqueeze(-1)
    assert torch.equal(out, torch.where(hard, 2 * x, x))


# ----------------------------------------------------------------------------- validation


def bad_routing_calls():
    conf = torch.rand(2, 3)
    x = torch.randn(2, 3, 4)
    with ops.use_backend("torch"):
        plan = ops.route(conf, 0.5, capacity=4)
    src = torch.randn(4, 4)
    return [
        ("confidence", TypeError, lambda: ops.route(conf > 0.5, 0.5)),
        ("threshold", ValueError, lambda: ops.route(conf, float("nan"))),
        ("threshold", ValueError, lambda: ops.route(conf, torch.tensor([0.5, 0.6]))),
        ("threshold", TypeError, lambda: ops.route(conf, "0.5")),
        ("threshold", TypeError, lambda: ops.route(conf, True)),
        ("capacity", ValueError, lambda: ops.route(conf, 0.5, capacity=-1)),
        ("capacity", TypeError, lambda: ops.route(conf, 0.5, capacity=2.0)),
        ("x", TypeError, lambda: ops.gather_tokens(x.long(), plan)),
        ("x", ValueError, lambda: ops.gather_tokens(x[:1], plan)),  # rows mismatch
        ("plan", TypeError, lambda: ops.gather_tokens(x, tuple(plan))),
        ("plan.indices", TypeError, lambda: ops.gather_tokens(x, plan._replace(indices=src))),
        ("base", ValueError, lambda: ops.scatter_tokens(x[:, :2], src, plan)),
        ("src", ValueError, lambda: ops.scatter_tokens(x, src[:, :3], plan)),  # width mismatch
        ("src", ValueError, lambda: ops.scatter_tokens(x, src[:3], plan)),  # rows mismatch
        ("src", ValueError, lambda: ops.scatter_tokens(x, src[0], plan)),
        ("src", TypeError, lambda: ops.scatter_tokens(x, src.half(), plan)),
        ("src", TypeError, lambda: ops.scatter_tokens(x, src.long(), plan)),
        # wrong devices ("meta" stands in for another device)
        ("threshold", ValueError, lambda: ops.route(conf, torch.tensor(0.5, device="meta"))),
        ("plan.indices", ValueError, lambda: ops.gather_tokens(x.to("meta"), plan)),
        ("src", ValueError, lambda: ops.scatter_tokens(x, src.to("meta"), plan)),
    ]


@pytest.mark.parametrize("case", range(len(bad_routing_calls())))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_argument(case, backend):
    name, error, call = bad_routing_calls()[case]
    with use(backend), pytest.raises(error, match=name.replace(".", r"\.")):
        call()


# ----------------------------------------------------------------------------- compile, graphs


def routed_block(confidence, threshold, x, weight):
    """Capacity-mode routing around a small layer, the way the model uses it."""
    plan = ops.route(confidence, threshold, capacity=x.shape[0] // 2)
    hard = ops.gather_tokens(x, plan)
    return ops.scatter_tokens(x, torch.tanh(hard @ weight), plan), plan.count


def test_capacity_mode_compiles_fullgraph_on_torch_backend():
    """No graph break (so no host sync) on the reference path; the kernels' turn is on CUDA."""
    confidence, x = torch.rand(16), torch.randn(16, 8, requires_grad=True)
    weight, threshold = torch.randn(8, 8), torch.tensor(0.5)
    with ops.use_backend("torch"):
        eager, eager_count = routed_block(confidence, threshold, x, weight)
        compiled = torch.compile(routed_block, backend="aot_eager", fullgraph=True)
        out, count = compiled(confidence, threshold, x, weight)
    assert torch.equal(out, eager) and torch.equal(count, eager_count)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (eager_grad,) = torch.autograd.grad(eager.sum(), x)
    assert torch.equal(grad, eager_grad)


@needs_cuda
def test_capacity_mode_does_not_synchronize():
    confidence = torch.rand(3000, device="cuda")
    x = torch.randn(3000, 64, device="cuda", requires_grad=True)
    threshold = torch.tensor(0.5, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = ops.route(confidence, threshold, capacity=2000)
        out = ops.scatter_tokens(x, ops.gather_tokens(x, plan) * 2, plan)
        out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    indices, count = expected_indices(confidence, 0.5, 2000)
    assert torch.equal(plan.indices, indices) and int(plan.count) == count


@needs_cuda
def test_capacity_mode_cuda_graph_replay():
    confidence = torch.rand(4096, device="cuda")
    x = torch.randn(4096, 128, device="cuda")
    weight = torch.randn(128, 128, device="cuda") / 16
    threshold = torch.tensor(0.3, device="cuda")
    routed_block(confidence, threshold, x, weight)  # compile the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, count = routed_block(confidence, threshold, x, weight)
    confidence.copy_(torch.rand_like(confidence))  # new inputs, same buffers
    threshold.fill_(0.6)
    graph.replay()
    with ops.use_backend("torch"):
        ref, ref_count = routed_block(confidence, threshold, x, weight)
    assert torch.equal(count, ref_count)
    torch.testing.assert_close(out, ref, rtol=3e-4, atol=3e-4)  # TF32 may differ in the matmul


@needs_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_capacity_mode_torch_compile_on_kernels(mode):
    confidence = torch.rand(1024, device="cuda")
    x = torch.randn(1024, 64, device="cuda", requires_grad=True)
    weight = torch.randn(64, 64, device="cuda") / 8
    compiled = torch.compile(routed_block, mode=mode, fullgraph=True)
    # A new threshold value must not break the graph (dynamo may make the float symbolic);
    # reduce-overhead records a CUDA graph after warm-up calls.
    for threshold in (0.5, 0.6, 0.5, 0.5):
        out, count = compiled(confidence, threshold, x, weight)
        with ops.use_backend("torch"):
            ref, ref_count = routed_block(confidence, threshold, x, weight)
        assert torch.equal(count, ref_count)
        torch.testing.assert_close(out, ref, rtol=3e-4, atol=3e-4)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(grad, ref_grad, rtol=3e-4, atol=3e-4)
