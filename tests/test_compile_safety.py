"""No graph break and no host synchronization on the hot paths (lego_kernels.compile_safety).

- ``SyncCounter`` and ``counting_backend`` count what synchronizes (``.item()``, ``bool()``,
  ``nonzero``, boolean masks) and nothing else (integer indexing, ``torch._assert_async``);
- every op of ``lego_kernels.ops`` as it is now (Python around ``autograd.Function``s; the
  torch backend, as ``TRITON_INTERPRET=1`` is set for the tests): ``torch._dynamo.explain``
  reports 0 graph breaks, and ``torch.compile(fullgraph=True)`` (``aot_eager``) equals eager,
  gradients included;
- ``LegoModel.forward`` and a training step (``Trainer.stage_losses`` + backward, one and
  several stages) compile with ``fullgraph=True`` under inductor and equal eager;
  ``early_exit(capacity=K)`` compiles with ``fullgraph=True`` and equals eager;
- data-dependent checks inside compiled code raise (out-of-range ids and targets), never a
  silently wrong loss; ``torch.export`` of a module calling the loss and the confidence
  runs, equals eager and keeps the target check;
- ``early_exit(capacity=K)`` and a compiled training step make no host synchronization;
- on CUDA (skipped without one): the same counts, and a CUDA-graph capture and replay of
  ``early_exit(capacity=K)`` equal to eager.

Tolerance: relative error ``||out - ref|| / ||ref||`` below 1e-5 (float32), exact for
integer outputs.
"""

import os

import pytest
import torch
import torch._dynamo

from lego import LegoModel, ModelConfig, StageConfig, TrainingConfig
from lego.trainer import Trainer
from lego_kernels import ops
from lego_kernels.compile_safety import SyncCounter, counting_backend
from lego_kernels.reference import MEASURES, REDUCTIONS

V, D, T = 61, 32, 8
F32_TOL = 1e-5
CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """The torch backend and a fresh dynamo cache for each test (no recompile limit)."""
    torch._dynamo.reset()
    with ops.use_backend("torch"):
        yield
    torch._dynamo.reset()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


def assert_same(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> None:
    """Float tensors within F32_TOL, the others exactly equal."""
    assert len(outs) == len(refs)
    for out, ref in zip(outs, refs, strict=True):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        if ref.is_floating_point():
            assert rel_err(out, ref) < F32_TOL
        else:
            assert torch.equal(out, ref)


def tensors(out: object) -> list[torch.Tensor]:
    """The tensors of an op's result (a tensor, or nested tuples of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out if not isinstance(item, int) for t in tensors(item)]


def break_reasons(fn, *args) -> list[str]:
    explain = torch._dynamo.explain(fn)(*args)
    assert explain.graph_break_count == len(explain.break_reasons)
    return [str(reason.reason) for reason in explain.break_reasons]


def small_model(num_layers: int = 4) -> LegoModel:
    config = ModelConfig(vocab_size=V, dim=D, num_layers=num_layers, num_heads=4, max_seq_len=16)
    return LegoModel(config)


# ----------------------------------------------------------------------------- the counter


def test_sync_counter_counts_scalar_reads_and_dynamic_shapes():
    x = torch.randn(6)
    with SyncCounter() as syncs:
        x.sum().item()
        bool(x.any())
        x.nonzero()
        x[x > 0]
    assert syncs.scalar_reads == 2 and syncs.dynamic_shapes == 2 and syncs.total == 4
    assert syncs.ops["aten.nonzero.default"] == 1
    with SyncCounter() as quiet:  # static shapes, checks that stay on the device
        x[torch.tensor([0, 2])]
        torch._assert_async((x == x).all(), "no NaN")
        x.cumsum(0)
    assert quiet.total == 0 and not quiet.ops


def test_counting_backend_counts_inside_the_compiled_graph():
    syncs = SyncCounter()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        fn = torch.compile(lambda x: x.nonzero() + 1, backend=counting_backend(syncs))
        assert torch.equal(fn(torch.tensor([0.0, 2.0, 3.0])), torch.tensor([[2], [3]]))
    assert syncs.ops == {"aten.nonzero.default": 1}


# ----------------------------------------------------------------------------- ops


def op_cases() -> dict[str, object]:
    """Each public op as a function of ``(x, weight, norm_weight, targets)``."""
    ce = ops.norm_head_cross_entropy
    cases = {}
    for reduction in REDUCTIONS:
        for conf in (False, True):
            cases[f"cross_entropy-{reduction}-confidence={conf}"] = (
                lambda x, w, nw, t, r=reduction, c=conf: ce(
                    x, w, t, nw, reduction=r, return_confidence=c
                )
            )
    for measure in MEASURES:
        cases[f"cross_entropy-{measure}"] = lambda x, w, nw, t, m=measure: ce(
            x, w, t, nw, reduction="none", return_confidence=True, measure=m
        )
        cases[f"exit_confidence-{measure}"] = lambda x, w, nw, t, m=measure: ops.exit_confidence(
            x, w, nw, measure=m
        )
        cases[f"confidence_from_logits-{measure}"] = lambda x, w, nw, t, m=measure: (
            ops.confidence_from_logits(x @ w.T, measure=m)
        )
    cases["cross_entropy-layer-norm-token-weights"] = lambda x, w, nw, t: ce(
        x, w, t, nw, nw, norm="layer", token_weights=(t % 3).float(), ignore_index=5
    )
    cases["norm_head_logits"] = lambda x, w, nw, t: ops.norm_head_logits(x, w, nw)

    def routing(x, w, nw, t):
        plan = ops.route(x[..., 0], 0.0, capacity=7)
        hard = ops.gather_tokens(x, plan)
        return ops.scatter_tokens(x, hard * nw, plan), plan.indices, plan.count

    cases["route-capacity-gather-scatter"] = routing
    return cases


OP_CASES = op_cases()


def op_inputs() -> list[torch.Tensor]:
    x = torch.randn(3, 5, D, requires_grad=True)
    w = (torch.randn(V, D) / D**0.5).requires_grad_()
    nw = (1 + 0.1 * torch.randn(D)).requires_grad_()
    return [x, w, nw, torch.randint(0, V, (3, 5))]


def run_with_grads(fn, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The op's outputs, then the gradients of the sum of its differentiable outputs."""
    leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
    outs = tensors(fn(*leaves))
    grad_outs = [o for o in outs if o.requires_grad]
    grads = []
    if grad_outs:
        wrt = [t for t in leaves if t.requires_grad]
        grads = torch.autograd.grad(sum(o.sum() for o in grad_outs), wrt, allow_unused=True)
        grads = [g for g in grads if g is not None]
    return [o.detach() for o in outs] + list(grads)


@pytest.mark.parametrize("name", list(OP_CASES))
def test_ops_compile_without_graph_breaks(name):
    fn, inputs = OP_CASES[name], op_inputs()
    assert break_reasons(fn, *inputs) == []
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert_same(run_with_grads(compiled, inputs), run_with_grads(fn, inputs))


# Inductor's own bounds check on the gathered target logit may fire before the range check.
RANGE_ERRORS = {
    "aot_eager": r"targets must lie in \[0, 61\) or equal ignore_index=-100",
    "inductor": r"targets must lie in \[0, 61\)|index out of bounds: 0 <= \w+ < 61",
}


@pytest.mark.parametrize("backend", list(RANGE_ERRORS))
def test_compiled_target_check_raises_instead_of_a_wrong_loss(backend):
    x, w, nw, t = op_inputs()
    fn = torch.compile(
        lambda x, t: ops.norm_head_cross_entropy(x, w, t, nw), backend=backend, fullgraph=True
    )
    assert rel_err(fn(x, t), ops.norm_head_cross_entropy(x, w, t, nw)) < F32_TOL
    for bad in (V, -1):
        with pytest.raises(RuntimeError, match=RANGE_ERRORS[backend]):
            fn(x, torch.where(t == t[0, 0], bad, t))
    ignored = torch.where(t == t[0, 0], -100, t)  # ignore_index passes
    assert rel_err(fn(x, ignored), ops.norm_head_cross_entropy(x, w, ignored, nw)) < F32_TOL


class ExitModule(torch.nn.Module):
    """A small module whose forward calls the fused loss and the exit confidence."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.RMSNorm(D)
        self.head = torch.nn.Linear(D, V, bias=False)

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        weight, norm_weight = self.head.weight, self.norm.weight
        loss = ops.norm_head_cross_entropy(x, weight, targets, norm_weight)
        conf = ops.exit_confidence(x, weight, norm_weight, measure="margin")
        return [loss, conf.confidence, conf.prediction]


def test_torch_export_runs_and_keeps_the_target_check():
    module, (x, _, _, t) = ExitModule(), op_inputs()
    x = x.detach()
    program = torch.export.export(module, (x, t))
    assert_same(program.module()(x, t), module(x, t))
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 61\)"):
        program.module()(x, torch.where(t == t[0, 0], V, t))


# ----------------------------------------------------------------------------- LegoModel


def test_forward_compiles_fullgraph_and_checks_ids():
    model = small_model(2)
    ids = torch.randint(0, V, (2, T))
    assert break_reasons(model, ids) == []
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    assert rel_err(compiled(ids), model(ids)) < F32_TOL
    with pytest.raises(RuntimeError, match=r"ids must lie in \[0, 61\)"):
        compiled(ids + V)


STAGES = {
    "one stage": [StageConfig((1, 2))],
    "several stages": [StageConfig((1, 1), loss_weight=0.5), StageConfig((2, 2))],
}


def training_step(loss_fn, model: LegoModel, ids, targets) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(ids, targets)
    loss.backward()
    return [loss.detach()] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("stages", list(STAGES))
def test_training_step_compiles_fullgraph(stages):
    model = small_model(2)
    trainer = Trainer(model, TrainingConfig(STAGES[stages]), quiet=True)
    ids, targets = torch.randint(0, V, (2, T)), torch.randint(0, V, (2, T))
    assert break_reasons(trainer.stage_losses, ids, targets) == []
    torch._dynamo.reset()
    compiled = torch.compile(trainer.stage_losses, fullgraph=True)
    eager = training_step(trainer.stage_losses, model, ids, targets)
    assert_same(training_step(compiled, model, ids, targets), eager)
    assert len(trainer.last_terms) == len(STAGES[stages])  # the side effect is replayed


def test_compiled_training_step_makes_no_host_synchronization():
    model = small_model(2)
    trainer = Trainer(model, TrainingConfig(STAGES["several stages"]), quiet=True)
    ids, targets = torch.randint(0, V, (2, T)), torch.randint(0, V, (2, T))
    syncs = SyncCounter()
    compiled = torch.compile(trainer.stage_losses, backend=counting_backend(syncs), fullgraph=True)
    eager = training_step(trainer.stage_losses, model, ids, targets)
    assert_same(training_step(compiled, model, ids, targets), eager)
    assert syncs.total == 0, syncs.ops
    with SyncCounter() as eager_syncs:  # the eager step neither
        training_step(trainer.stage_losses, model, ids, targets)
    assert eager_syncs.total == 0, eager_syncs.ops


def early_exit_outputs(model, ids, targets, context: str, capacity: int | None):
    out = model.early_exit(
        ids, exit_layer=2, threshold=0.2, context=context, targets=targets, capacity=capacity
    )
    stats = out.stats
    return [out.prediction, out.confidence, out.exited, out.nll, stats.overflow, stats.exit_ratio]


@pytest.mark.parametrize("context", ["propagate", "routed"])
def test_early_exit_with_capacity_makes_no_host_synchronization(context):
    model = small_model(4)
    ids, targets = torch.randint(0, V, (3, T)), torch.randint(0, V, (3, T))
    for with_targets in (None, targets):
        with SyncCounter() as syncs:
            early_exit_outputs(model, ids, with_targets, context, capacity=10)
        assert syncs.total == 0, syncs.ops
    with SyncCounter() as syncs:  # without a capacity: route's nonzero and the layout width
        early_exit_outputs(model, ids, targets, context, capacity=None)
    assert syncs.ops["aten.nonzero.default"] == 1 and syncs.scalar_reads == 1


def test_early_exit_with_capacity_compiles_fullgraph():
    model = small_model(3)
    ids, targets = torch.randint(0, V, (3, T)), torch.randint(0, V, (3, T))

    def call(ids, targets):
        return early_exit_outputs(model, ids, targets, "propagate", capacity=10)

    assert break_reasons(call, ids, targets) == []
    torch._dynamo.reset()
    compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
    eager = call(ids, targets)
    assert eager[4] > 0 and not eager[2].all()  # some overflow, some hard tokens
    assert_same(compiled(ids, targets), eager)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and LEGO_TEST_CUDA=1 (interpreter off)")
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_early_exit_with_capacity_in_a_cuda_graph(backend):
    torch.manual_seed(0)
    model = small_model(4).cuda()
    ids = torch.randint(0, V, (3, T), device="cuda")
    targets = torch.randint(0, V, (3, T), device="cuda")
    with ops.use_backend(backend):
        early_exit_outputs(model, ids, targets, "propagate", capacity=10)  # Triton compiles
        torch.cuda.set_sync_debug_mode("error")  # a synchronizing CUDA call raises
        try:
            with SyncCounter() as syncs:
                eager = early_exit_outputs(model, ids, targets, "propagate", capacity=10)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert syncs.total == 0, syncs.ops
        static_ids, static_targets = ids.clone(), targets.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (Triton compiles) outside the capture
            for _ in range(2):
                early_exit_outputs(model, static_ids, static_targets, "propagate", capacity=10)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = early_exit_outputs(model, static_ids, static_targets, "propagate", 10)
        graph.replay()
        torch.cuda.synchronize()
        assert_same(captured, eager)
        new_ids = torch.randint(0, V, (3, T), device="cuda")
        static_ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        assert_same(captured, early_exit_outputs(model, new_ids, targets, "propagate", 10))
