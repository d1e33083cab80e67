"""LegoModel against textbook references.

References (written here, independent of ``lego.model``):
- ``reference_rope``: rotation of complex pairs ``(x_i + i x_{i + hd/2}) * e^{i pos theta_i}``;
- ``reference_layer``: pre-norm layer with explicit masked softmax attention (einsum), or
  the original code's post-norm layer (``norm(h + attn(h))``, ``norm(h + ffn(h))``);
- ``reference_deep_layers``: DESIGN section 4, every deeper layer on all tokens with exited
  tokens frozen by ``where(hard, new, old)`` and keys masked as the context says;
- losses: ``torch.nn.functional.cross_entropy`` on the reference logits.

Tolerance: relative error ``||out - ref|| / ||ref||`` below 1e-5 in float32 (DESIGN
section 5); gradients 1e-4 (they sum many float32 products). Everything runs on the
torch backend except ``test_early_exit_under_triton_interpreter``.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import lego.model
from lego import LegoModel, ModelConfig
from lego.config import ARCHS, arch_fields
from lego.model import apply_rope
from lego_kernels import ops

V, D, HEADS, T = 61, 32, 4, 8
F32_TOL = 1e-5
GRAD_TOL = 1e-4
CONTEXTS = ("propagate", "routed")


@pytest.fixture(autouse=True)
def torch_backend():
    with ops.use_backend("torch"):
        yield


def small_model(num_layers: int = 4, **kwargs) -> LegoModel:
    config = ModelConfig(
        vocab_size=V, dim=D, num_layers=num_layers, num_heads=HEADS, max_seq_len=16, **kwargs
    )
    return LegoModel(config)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


# ----------------------------------------------------------------------------- references


def reference_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """x [B, T, H, hd] rotated as complex pairs (x_i, x_{i + hd/2}), in float64."""
    half = x.shape[-1] // 2
    theta = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    angle = positions.double()[:, None, None] * theta
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(
        torch.ones_like(angle), angle
    )
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def reference_layer(
    block, h: torch.Tensor, key_mask: torch.Tensor, base: float, post: bool = False
) -> torch.Tensor:
    """One pre-norm (``post``: post-norm) layer on all tokens; key_mask bool [B, T, T]."""
    batch, seq_len, dim = h.shape
    head_dim = dim // block.num_heads
    positions = torch.arange(seq_len)

    def heads(y):
        return y.view(batch, seq_len, block.num_heads, head_dim)

    x = h if post else block.attn_norm(h)
    q = reference_rope(heads(block.wq(x)), positions, base)
    k = reference_rope(heads(block.wk(x)), positions, base)
    v = heads(block.wv(x))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    scores = scores.masked_fill(~key_mask[:, None], float("-inf"))
    attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(batch, seq_len, dim)
    if post:
        h = block.attn_norm(h + block.wo(attn))
        return block.ffn_norm(h + block.down(F.silu(block.gate(h)) * block.up(h)))
    h = h + block.wo(attn)
    x = block.ffn_norm(h)
    return h + block.down(F.silu(block.gate(x)) * block.up(x))


def is_post(model: LegoModel) -> bool:
    return model.config.norm_position == "post"


def causal_mask(batch: int, seq_len: int) -> torch.Tensor:
    return torch.ones(seq_len, seq_len, dtype=torch.bool).tril().expand(batch, -1, -1)


def reference_states(model: LegoModel, ids: torch.Tensor, depth: int) -> torch.Tensor:
    h = model.embedding(ids)
    for block in model.layers[:depth]:
        h = reference_layer(
            block, h, causal_mask(*ids.shape), model.config.rope_base, is_post(model)
        )
    return h


def reference_logits(model: LegoModel, states: torch.Tensor, exit_layer: int) -> torch.Tensor:
    exit_ = model.exits[exit_layer - 1 if model.config.per_exit_heads else 0]
    return exit_.head(states if exit_.norm is None else exit_.norm(states))


def reference_deep_layers(model, h, hard, start, end, context):
    """DESIGN section 4: every layer on all tokens, exited ones frozen with where()."""
    batch, seq_len, _ = h.shape
    key_mask = causal_mask(batch, seq_len)
    if context == "routed":  # keys of hard tokens only (and its own, so exited rows stay finite)
        key_mask = key_mask & (hard[:, None, :] | torch.eye(seq_len, dtype=torch.bool))
    for block in model.layers[start - 1 : end]:
        new = reference_layer(block, h, key_mask, model.config.rope_base, is_post(model))
        h = torch.where(hard[..., None], new, h)
    return h


def mixed_hard_mask() -> torch.Tensor:
    """[3, T]: sequence 0 has no hard token, sequence 1 only hard ones, sequence 2 a mix."""
    mixed = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    return torch.stack([torch.zeros(T, dtype=torch.bool), torch.ones(T, dtype=torch.bool), mixed])


# ----------------------------------------------------------------------------- dense path


def test_rope_matches_complex_rotation_and_is_relative():
    x = torch.randn(2, T, HEADS, D // HEADS)
    positions = torch.arange(T)
    assert rel_err(apply_rope(x, positions, 100.0), reference_rope(x, positions, 100.0)) < F32_TOL
    # q.k after rotation depends on the position difference only
    q, k = torch.randn(D // HEADS), torch.randn(D // HEADS)
    dots = [
        (apply_rope(q, torch.tensor(m), 1e4) * apply_rope(k, torch.tensor(m - 3), 1e4)).sum()
        for m in (3, 7, 12)
    ]
    torch.testing.assert_close(dots[1], dots[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dots[2], dots[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("per_exit_heads", [False, True])
def test_forward_at_each_exit_matches_reference(norm, per_exit_heads):
    model = small_model(3, norm=norm, per_exit_heads=per_exit_heads)
    if norm == "layer":  # make the exit norm's bias matter
        for exit_ in model.exits:
            torch.nn.init.normal_(exit_.norm.bias)
    assert len(model.exits) == (3 if per_exit_heads else 1)
    ids = torch.randint(0, V, (2, T))
    for layer in (1, 2, 3):
        logits = model(ids, exit_layer=layer)
        assert logits.shape == (2, T, V) and logits.dtype == torch.float32
        ref = reference_logits(model, reference_states(model, ids, layer), layer)
        assert rel_err(logits, ref) < F32_TOL
    torch.testing.assert_close(model(ids), model(ids, exit_layer=3), rtol=0, atol=0)


def test_seed_arch_is_the_original_block_and_init():
    """``--arch seed``: post-norm layers, exits without a norm, SwiGLU width 4 x dim,
    linear weights ~ truncated N(0, 1/dim), embedding ~ N(0, 0.02^2); the default
    config is untouched by the variant's fields."""
    config = ModelConfig(vocab_size=V, dim=D, num_heads=HEADS, **arch_fields("seed", D))
    assert (config.norm_position, config.exit_norm, config.hidden_dim) == ("post", False, 4 * D)
    assert arch_fields("lego", D) == {}
    torch.manual_seed(0)
    model = small_model(3, **{k: v for k, v in arch_fields("seed", D).items()})
    assert model.exits[0].norm is None and "exits.0.norm.weight" not in model.state_dict()
    ids = torch.randint(0, V, (2, T))
    for layer in (1, 3):
        ref = reference_logits(model, reference_states(model, ids, layer), layer)
        assert rel_err(model(ids, exit_layer=layer), ref) < F32_TOL
    wide = LegoModel(ModelConfig(vocab_size=4000, dim=64, num_heads=4, **arch_fields("seed", 64)))
    head = wide.exits[0].head.weight
    assert abs(head.std().item() - 1 / 8) < 0.01 and head.abs().max() <= 2.0
    assert abs(wide.embedding.weight.std().item() - 0.02) < 0.002
    assert abs(wide.layers[0].down.weight.std().item() - 1 / 8) < 0.01  # 1/sqrt(dim), not fan-in
    # The head flops of an exit without norm leave the norm out.
    default = LegoModel(ModelConfig(vocab_size=4000, dim=64, num_heads=4, hidden_dim=256))
    assert default.flops(1, 8) - wide.flops(1, 8) == 8 * lego.model.NORM_FLOPS_PER_ELEMENT * 64
    # The original's phase-2 log at its vocabulary: 4,600,448 of 9,200,896 parameters
    # trainable (layers 3-4 and the shared head; embedding and layers 1-2 frozen).
    with torch.device("meta"):
        seed4 = LegoModel(ModelConfig(vocab_size=69_830, num_layers=4, **arch_fields("seed", 64)))
    seed4.freeze_lower(2)
    assert sum(p.numel() for p in seed4.parameters()) == 9_200_896
    assert sum(p.numel() for p in seed4.parameters() if p.requires_grad) == 4_600_448
    with pytest.raises(ValueError, match="norm_position"):
        ModelConfig(vocab_size=V, norm_position="sandwich")
    with pytest.raises(ValueError, match="init"):
        ModelConfig(vocab_size=V, init="xavier")
    with pytest.raises(TypeError, match="exit_norm"):
        ModelConfig(vocab_size=V, exit_norm=0)
    with pytest.raises(ValueError, match="arch"):
        arch_fields("gpt", D)


def test_exit_loss_and_confidence_use_that_exit():
    model = small_model(2, per_exit_heads=True)
    ids, targets = torch.randint(0, V, (2, T)), torch.randint(0, V, (2, T))
    h = model.run_layers(model.embed(ids), 1, 1)
    assert model.embed(ids).shape == (2, T, D)
    logits = reference_logits(model, reference_states(model, ids, 1), 1)
    loss = model.exit_loss(h, targets, exit_layer=1)
    assert rel_err(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten())) < F32_TOL
    conf = model.exit_confidence(h, exit_layer=1)
    assert rel_err(conf.confidence, logits.softmax(-1).amax(-1)) < F32_TOL
    assert torch.equal(conf.prediction, logits.argmax(-1))


def test_bad_input_names_the_argument():
    model = small_model(2)
    ids = torch.randint(0, V, (2, T))
    cases = [
        (TypeError, "ids", lambda: model(ids.float())),
        (ValueError, "ids", lambda: model(ids[0])),
        (ValueError, r"ids must lie in \[0, 61\)", lambda: model(ids + V)),
        (ValueError, "max_seq_len", lambda: model(torch.zeros(1, 17, dtype=torch.long))),
        (ValueError, "exit_layer", lambda: model(ids, exit_layer=3)),
        (ValueError, "exit_layer", lambda: model.early_exit(ids, exit_layer=2, threshold=0.5)),
        (ValueError, "threshold", lambda: model.early_exit(ids, exit_layer=1, threshold=math.nan)),
        (
            ValueError,
            "context",
            lambda: model.early_exit(ids, exit_layer=1, threshold=0.5, context="all"),
        ),
        (ValueError, "end", lambda: model.run_layers(torch.zeros(2, T, D), 2, 0)),
        (ValueError, "h must be", lambda: model.run_layers(torch.zeros(2, T, D + 1), 1, 1)),
        (TypeError, "hard", lambda: model.run_layers_routed(torch.zeros(2, T, D), ids, 2, 2)),
        (ValueError, "num_layers", lambda: model.extend(2)),
        (ValueError, "k must be", lambda: model.freeze_lower(3)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()


# ----------------------------------------------------------------------------- routed path


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_run_layers_routed_matches_reference(context, arch):
    model = small_model(4, **arch_fields(arch, D))
    hard = mixed_hard_mask()
    h = model.run_layers(model.embed(torch.randint(0, V, (3, T))), 1, 2)
    out = model.run_layers_routed(h, hard, 3, 4, context=context)
    ref = reference_deep_layers(model, h, hard, 3, 4, context)
    assert rel_err(out, ref) < F32_TOL
    assert torch.equal(out[~hard], h[~hard])  # exited tokens keep their state exactly
    # no hard token: nothing runs; every token hard: the dense layers
    assert torch.equal(model.run_layers_routed(h, torch.zeros_like(hard), 3, 4), h)
    everyone = model.run_layers_routed(h, torch.ones_like(hard), 3, 4, context=context)
    assert rel_err(everyone, model.run_layers(h, 3, 4)) < F32_TOL


def two_stage_batch(model: LegoModel, exit_layer: int) -> tuple[torch.Tensor, float]:
    """ids [3, T] and a threshold with which sequence 0 exits entirely, sequence 1 stays
    entirely and sequence 2 splits: constant sequences have nearly constant confidence,
    so the most and least confident tokens give the first two, alternating them the third."""
    candidates = torch.arange(V)[:, None].expand(V, T)
    conf = model.exit_confidence(
        model.run_layers(model.embed(candidates), 1, exit_layer), exit_layer=exit_layer
    ).confidence
    easy, hard = conf.amin(1).argmax(), conf.amax(1).argmin()
    assert conf[easy].min() > conf[hard].max()  # precondition of the test
    threshold = ((conf[easy].min() + conf[hard].max()) / 2).item()
    mixed = torch.where(torch.arange(T) % 3 == 0, easy, hard)
    return torch.stack([candidates[easy], candidates[hard], mixed]), threshold


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_early_exit_matches_reference(context, arch):
    model = small_model(4, **arch_fields(arch, D))
    ids, threshold = two_stage_batch(model, exit_layer=2)
    targets = torch.randint(0, V, ids.shape)
    targets[2, 1] = -100
    out = model.early_exit(ids, exit_layer=2, threshold=threshold, context=context, targets=targets)
    assert out.exited[0].all() and not out.exited[1].any()
    assert out.exited[2].any() and not out.exited[2].all()

    lower = reference_states(model, ids, 2)
    exit_logits = reference_logits(model, lower, 2)
    hard = exit_logits.softmax(-1).amax(-1) < threshold
    assert torch.equal(out.exited, ~hard)
    assert rel_err(out.confidence, exit_logits.softmax(-1).amax(-1)) < F32_TOL
    deep = reference_deep_layers(model, lower, hard, 3, 4, context)
    logits = torch.where(hard[..., None], reference_logits(model, deep, 4), exit_logits)
    assert torch.equal(out.prediction, logits.argmax(-1))
    ref_nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    assert out.nll.dtype == torch.float32 and out.nll[2, 1] == 0
    assert rel_err(out.nll, ref_nll) < F32_TOL

    stats = out.stats
    num_hard = int(hard.sum())
    assert stats.exit_ratio == pytest.approx(1 - num_hard / ids.numel())
    assert stats.layer_cost == pytest.approx((2 * ids.numel() + 2 * num_hard) / (4 * ids.numel()))
    assert stats.full_flops == model.flops(3, T)
    assert 0 < stats.flops_cost < 1 and stats.wall_time_s > 0
    assert model.early_exit(ids, exit_layer=2, threshold=threshold).nll is None


@pytest.mark.parametrize("context", CONTEXTS)
def test_early_exit_threshold_extremes(context):
    model = small_model(3)
    ids, targets = torch.randint(0, V, (2, T)), torch.randint(0, V, (2, T))
    for threshold, layer in ((0.0, 1), (1.5, 3)):
        out = model.early_exit(
            ids, exit_layer=1, threshold=threshold, context=context, targets=targets
        )
        logits = model(ids, exit_layer=layer)
        assert out.exited.all() == (threshold == 0.0) and out.exited.any() == (threshold == 0.0)
        assert torch.equal(out.prediction, logits.argmax(-1))
        ref_nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        assert rel_err(out.nll, ref_nll) < F32_TOL
    all_exit = model.early_exit(ids, exit_layer=1, threshold=0.0)
    assert all_exit.stats.flops == model.flops(2, T, depth=1)
    assert all_exit.stats.layer_cost == pytest.approx(1 / 3)


def first_hard(hard: torch.Tensor, capacity: int) -> torch.Tensor:
    """The hard tokens that get one of ``capacity`` slots: the first ones in flat order."""
    return hard & (hard.flatten().cumsum(0) <= capacity).view_as(hard)


@pytest.mark.parametrize("context", CONTEXTS)
def test_early_exit_with_capacity_matches_reference(context):
    """A capacity keeps the first hard tokens (flat order), the others exit at the exit
    layer; with room for all it equals the call without capacity."""
    model = small_model(4)
    ids, threshold = two_stage_batch(model, exit_layer=2)
    targets = torch.randint(0, V, ids.shape)
    lower = reference_states(model, ids, 2)
    exit_logits = reference_logits(model, lower, 2)
    hard = exit_logits.softmax(-1).amax(-1) < threshold
    num_hard = int(hard.sum())
    kwargs = {"exit_layer": 2, "threshold": threshold, "context": context, "targets": targets}
    free = model.early_exit(ids, **kwargs)
    # room for all (with free slots), sequence 2 split, only sequence 1's first tokens, none
    for capacity in (num_hard + 3, num_hard - 2, 5, 0):
        out = model.early_exit(ids, **kwargs, capacity=capacity)
        kept = first_hard(hard, capacity)
        assert torch.equal(out.exited, ~kept)
        deep = reference_deep_layers(model, lower, kept, 3, 4, context)
        logits = torch.where(kept[..., None], reference_logits(model, deep, 4), exit_logits)
        assert torch.equal(out.prediction, logits.argmax(-1))
        ref_nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        assert rel_err(out.nll, ref_nll) < F32_TOL
        stats, num_kept = out.stats, int(kept.sum())
        assert int(stats.overflow) == num_hard - num_kept
        assert stats.exit_ratio.item() == pytest.approx(1 - num_kept / ids.numel())
        assert stats.layer_cost.item() == pytest.approx(
            (2 * ids.numel() + 2 * num_kept) / (4 * ids.numel())
        )
        if capacity >= num_hard:
            assert torch.equal(out.prediction, free.prediction)
            assert rel_err(out.nll, free.nll) < F32_TOL
            assert stats.exit_ratio.item() == pytest.approx(free.stats.exit_ratio)


@pytest.mark.parametrize("context", CONTEXTS)
def test_gradients_reach_only_the_new_layers(context):
    model = small_model(2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.extend(4)
    assert model.config.num_layers == 4 and len(model.layers) == 4
    assert all(
        torch.equal(p, before[name]) for name, p in model.named_parameters() if name in before
    )
    model.freeze_lower(2, head=True)
    ids, targets = torch.randint(0, V, (3, T)), torch.randint(0, V, (3, T))
    hard = mixed_hard_mask()

    def loss_of(states):  # phase 2: the loss of the hard tokens at the last exit
        return model.exit_loss(states, targets, token_weights=hard.float())

    h = model.run_layers(model.embed(ids), 1, 2)
    loss_of(model.run_layers_routed(h, hard, 3, 4, context=context)).backward()
    new_params = [p for layer in model.layers[2:] for p in layer.parameters()]
    grads = [p.grad.clone() for p in new_params]
    frozen = [model.embedding, *model.layers[:2], *model.exits]
    assert all(p.grad is None and not p.requires_grad for m in frozen for p in m.parameters())
    assert all(g.abs().sum() > 0 for g in grads)

    model.zero_grad()
    loss_of(reference_deep_layers(model, h, hard, 3, 4, context)).backward()
    for p, g in zip(new_params, grads, strict=True):
        assert rel_err(g, p.grad) < GRAD_TOL


def test_extend_and_freeze_with_per_exit_heads():
    model = small_model(2, per_exit_heads=True)
    model.extend(3)
    assert len(model.exits) == 3 and model.config.num_layers == 3
    assert model(torch.randint(0, V, (1, T)), exit_layer=3).shape == (1, T, V)
    model.freeze_lower(1)
    trainable = {
        name.split(".")[0] + "." + name.split(".")[1]
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    assert trainable == {"layers.1", "layers.2", "exits.1", "exits.2"}


# ----------------------------------------------------------------------------- FLOPs


def test_flops_match_flop_counter(monkeypatch):
    """The analytic count equals FlopCounterMode's matmuls (SDPA's math path, so its two
    bmm are counted) once norms, which the counter does not see, are left out."""
    monkeypatch.setattr(lego.model, "NORM_FLOPS_PER_ELEMENT", 0)
    model = small_model(4)
    ids = torch.randint(0, V, (3, T))
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter:
            model(ids)
        assert counter.get_total_flops() == model.flops(3, T)
        ids, threshold = two_stage_batch(model, exit_layer=2)
        for context in CONTEXTS:
            with FlopCounterMode(display=False) as counter:
                stats = model.early_exit(
                    ids, exit_layer=2, threshold=threshold, context=context
                ).stats
            assert counter.get_total_flops() == stats.flops < stats.full_flops
            for capacity in (5, 20):  # the work of every slot, used or not
                with FlopCounterMode(display=False) as counter:
                    stats = model.early_exit(
                        ids, exit_layer=2, threshold=threshold, context=context, capacity=capacity
                    ).stats
                assert counter.get_total_flops() == stats.flops


@pytest.mark.parametrize("context", CONTEXTS)
def test_deep_layer_flops_scale_with_hard_fraction(context):
    """FlopCounterMode on two routed layers, the first n of T tokens of each of B sequences
    hard: the matmuls run for the hard tokens (K/V for all tokens when propagating)."""
    model = small_model(4)
    batch, hidden = 3, model.config.hidden_dim
    h = torch.randn(batch, T, D)
    counted = {}
    for n in (2, 4, T):
        hard = (torch.arange(T) < n).expand(batch, T)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model.run_layers_routed(h, hard, 3, 4, context=context)
        counted[n] = counter.get_total_flops()
        queries = batch * n
        keys = batch * T if context == "propagate" else queries
        per_layer = (
            2 * queries * 2 * D * D  # Q and O projections
            + 2 * keys * 2 * D * D  # K and V projections
            + 3 * queries * 2 * D * hidden  # SwiGLU
            + 2 * batch * n * (T if context == "propagate" else n) * 2 * D  # QK^T and PV
        )
        assert counted[n] == 2 * per_layer
    full = 2 * model.flops(batch, T, depth=1, head_tokens=0) - 2 * 2 * 4 * D * batch * T
    assert counted[T] == full  # everyone hard costs the dense layers (norms aside)
    assert counted[2] < counted[4] < counted[T]
    assert counted[2] / counted[T] < (0.45 if context == "propagate" else 0.3)


# ----------------------------------------------------------------------------- interpreter


def test_early_exit_under_triton_interpreter():
    """The same two-stage call on the Triton kernels (interpreter) and on the torch backend."""
    model = small_model(3)
    ids, targets = torch.randint(0, V, (2, 4)), torch.randint(0, V, (2, 4))
    conf = model.exit_confidence(model.run_layers(model.embed(ids), 1, 1), exit_layer=1)
    threshold = conf.confidence.median().item()
    ref = model.early_exit(ids, exit_layer=1, threshold=threshold, targets=targets)
    with ops.use_backend("auto"):
        assert ops.backend(ids.float()) == "triton-interpreter"
        out = model.early_exit(ids, exit_layer=1, threshold=threshold, targets=targets)
    assert torch.equal(out.exited, ref.exited) and not out.exited.all() and out.exited.any()
    assert torch.equal(out.prediction, ref.prediction)
    assert rel_err(out.nll, ref.nll) < F32_TOL
