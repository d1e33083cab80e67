"""LegoModel: a decoder-only Transformer with exits after its layers, and real early exit.

Architecture (pre-norm by default, no dropout, no biases in the linear layers)::

    h = embedding(ids)                                   # [B, T, D]
    for each layer:   h = h + attention(norm(h))         # RoPE multi-head causal attention
                      h = h + swiglu(norm(h))            # down(silu(gate(x)) * up(x))
    exit at layer l:  logits = head_l(norm_l(h))         # through lego_kernels.ops

``config.norm_position="post"`` makes each layer ``h = norm(h + attention(h))``,
``h = norm(h + swiglu(h))``, and ``config.exit_norm=False`` drops ``norm_l`` (the
original research code's block, ``--arch seed``); every path (dense, hard tokens,
cached decoding) takes the variant from ``Block.attn_input`` and ``Block.finish``.

The blocks' norms are plain PyTorch (``nn.RMSNorm`` / ``nn.LayerNorm`` per
``config.norm``); every exit goes through ``lego_kernels.ops`` (fused norm + head
logits, one-pass confidence, fused cross-entropy) with the exit's norm weight/bias
and head weight. One exit norm + head is shared by every exit, or, with
``config.per_exit_heads``, each layer has its own.

Two-stage inference (``early_exit``, DESIGN section 4) runs the lower layers on
all tokens, routes the tokens whose exit confidence is below the threshold
(``ops.route``), and runs the deeper layers on those *hard* tokens only
(``run_layers_routed``): queries, attention output and FFN are computed for the
gathered ``[K, D]`` hard rows; the keys/values they attend to depend on ``context``:

- ``"propagate"``: every earlier position of the sequence; an exited token gives
  keys/values computed from its exit-layer state (CALM's state propagation), so the
  deeper layers' norm + key/value projections run on all tokens.
- ``"routed"``: only the earlier hard tokens of the same sequence (Mixture-of-Depths);
  nothing runs for exited tokens.

Attention over the gathered queries uses per-sequence padding: the hard tokens of
sequence ``b`` fill the first ``count_b`` slots of a ``[B, M, ...]`` buffer
(``M = max_b count_b``), so SDPA runs on ``B x M`` queries against ``T`` keys
(propagate, with an explicit ``[B, M, T]`` causal mask over absolute positions) or
``M`` keys (routed, plain ``is_causal``: slots ascend with positions). This costs
``B * M * T`` score entries, close to the ``K * T`` needed when the hard tokens are
spread evenly over the sequences, where one SDPA of all ``K`` queries against all
``B * T`` keys with a ``[K, B * T]`` mask would cost ``B`` times more; and it needs no
Python loop.

With ``early_exit(..., capacity=K)`` the plan has ``K`` slots whatever the data (hard
tokens past them exit, free slots hold zero rows) and ``M = min(K, T)``, so every shape
is static and the call never waits for the device (CUDA graphs, ``torch.compile``);
the price is that the deeper layers always run ``K`` rows and ``B * M * T`` scores.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lego.config import ModelConfig
from lego_kernels import ops

if TYPE_CHECKING:
    from lego.generation import GenerationOutput

CONTEXTS = ("propagate", "routed")
NORM_FLOPS_PER_ELEMENT = 4  # analytic FLOP convention for a norm (see LegoModel.flops)


def rope_tables(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """Rotary cos/sin for integer ``positions [...]``: two float32 ``[..., 1, head_dim // 2]``.

    The singleton dim broadcasts over the heads of a ``[..., H, head_dim]`` tensor.
    """
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = base ** (-exponents / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)


def apply_rope(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """Rotate ``x [..., H, head_dim]`` at integer ``positions`` (shape ``x.shape[:-2]`` or
    broadcastable to it). Half-split pairs: dim ``i`` pairs with ``i + head_dim / 2``.
    Computed in float32, returned in ``x.dtype``."""
    cos, sin = rope_tables(positions, x.shape[-1], base)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    """``nn.RMSNorm`` or ``nn.LayerNorm`` over ``config.dim``, per ``config.norm``."""
    if config.norm == "rms":
        return nn.RMSNorm(config.dim, eps=config.norm_eps)
    return nn.LayerNorm(config.dim, eps=config.norm_eps)


def attention(q: Tensor, k: Tensor, v: Tensor, **sdpa_kwargs: object) -> Tensor:
    """SDPA on ``q [B, Tq, H, hd]``, ``k, v [B, Tk, H, hd]`` -> ``[B, Tq, H, hd]``."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **sdpa_kwargs
    )
    return out.transpose(1, 2)


def _clock() -> float:
    """``time.perf_counter()``; NaN inside ``torch.compile``, which cannot trace a clock."""
    return math.nan if torch.compiler.is_compiling() else time.perf_counter()


def put_rows(base: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """Copy of ``base [N, ...]`` with row ``index[k]`` replaced by ``src[k]``, skipping the
    -1 entries of ``index`` (int64 ``[K]``; the free slots of a plan with a capacity).
    Any dtype; differentiable w.r.t. ``base`` and ``src``."""
    num = base.shape[0]
    padded = torch.cat([base, base.new_zeros(1, *base.shape[1:])])
    return padded.index_copy(0, torch.where(index >= 0, index, num), src)[:num]


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` (int64 ``[K]``) of ``x [N, ...]``: ``[K, ...]``, zeros where it is -1."""
    padded = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
    return padded.index_select(0, torch.where(index >= 0, index, x.shape[0]))


@dataclasses.dataclass
class HardLayout:
    """Where the ``K`` slots of a routing plan over a ``[B, T]`` batch sit in a padded
    ``[B, M]`` layout.

    - ``plan``: the routing plan; ``plan.indices`` int64 ``[K]``, ascending flat indices
      ``b * T + t``, then -1 in the free slots of a plan built with a capacity;
    - ``positions``: int64 ``[K]``, each hard token's absolute position ``t``;
    - ``flat``: int64 ``[K]``, each hard token's place ``b * M + m`` in the flattened
      ``[B * M]`` layout (``m``: its rank among the hard tokens of sequence ``b``); -1 for
      a free slot;
    - ``width``: ``M``; by default the largest number of hard tokens in one sequence;
    - ``key_mask``: bool ``[B, 1, M, T]`` (``"propagate"`` only): slot ``m`` of sequence
      ``b`` sees the keys at positions up to its own; padding slots see position 0,
      so no row is fully masked.
    """

    plan: ops.RoutePlan
    num_sequences: int
    seq_len: int
    positions: Tensor
    flat: Tensor
    width: int
    key_mask: Tensor | None

    @classmethod
    def build(
        cls,
        plan: ops.RoutePlan,
        batch_size: int,
        seq_len: int,
        context: str,
        width: int | None = None,
    ) -> HardLayout:
        """The layout of ``plan`` (``K >= 1`` slots). ``width=None`` reads the tightest
        ``M`` on the host (one synchronization); an int (at least the largest number of
        hard tokens in one sequence, e.g. ``min(capacity, T)``) keeps everything on the
        device."""
        index = plan.indices
        used = index >= 0
        # Ascending plan: each sequence's hard tokens are consecutive, free slots last
        # (their "sequence" B), so a token's rank is its distance to its sequence's first.
        batch = torch.where(used, index // seq_len, batch_size)
        positions = index % seq_len
        slot = torch.arange(index.numel(), device=index.device)
        slot = slot - torch.searchsorted(batch, batch)
        if width is None:
            width = int(slot.max()) + 1  # one host synchronization
        flat = torch.where(used, batch * width + slot, -1)
        key_mask = None
        if context == "propagate":
            query_pos = put_rows(index.new_zeros(batch_size * width), flat, positions)
            key_pos = torch.arange(seq_len, device=index.device)
            key_mask = (key_pos <= query_pos.view(batch_size, width, 1)).unsqueeze(1)
        return cls(plan, batch_size, seq_len, positions, flat, width, key_mask)

    def pad(self, x: Tensor) -> Tensor:
        """``[K, ...] -> [B, M, ...]`` with zeros in the padding slots (differentiable)."""
        rows = x.new_zeros(self.num_sequences * self.width, *x.shape[1:])
        return put_rows(rows, self.flat, x).unflatten(0, (self.num_sequences, self.width))

    def unpad(self, x: Tensor) -> Tensor:
        """``[B, M, ...] -> [K, ...]``: the rows of the hard tokens (zeros for free slots)."""
        return take_rows(x.flatten(0, 1), self.flat)


class Block(nn.Module):
    """Transformer layer: RoPE multi-head causal attention, then a SwiGLU FFN, with
    pre-norm (default) or post-norm residuals (``config.norm_position``).

    ``block(h)`` maps ``[B, T, D] -> [B, T, D]`` with full causal attention;
    ``forward_hard`` runs the same layer on the hard tokens only.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim, hidden = config.dim, config.hidden_dim
        self.num_heads = config.num_heads
        self.rope_base = config.rope_base
        self.post_norm = config.norm_position == "post"
        self.attn_norm = make_norm(config)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.ffn_norm = make_norm(config)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def attn_input(self, h: Tensor) -> Tensor:
        """What the attention projections read from the states ``h [..., D]``: ``attn_norm(h)``
        (pre-norm), ``h`` itself (post-norm).

        Every path (dense, hard tokens, cached decoding) goes through this and ``finish``,
        so a variant of the block changes these two only."""
        return h if self.post_norm else self.attn_norm(h)

    def project(self, linear: nn.Linear, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """``linear(x)`` split into heads ``[..., H, hd]``, rotated at ``positions`` if given."""
        y = linear(x).unflatten(-1, (self.num_heads, -1))
        return y if positions is None else apply_rope(y, positions, self.rope_base)

    def finish(self, h: Tensor, attn: Tensor) -> Tensor:
        """Residual of the attention output ``attn [..., H, hd]``, then the SwiGLU FFN
        (post-norm: each residual sum normalized)."""
        h = h + self.wo(attn.flatten(-2))
        if self.post_norm:
            h = self.attn_norm(h)
            return self.ffn_norm(h + self.down(F.silu(self.gate(h)) * self.up(h)))
        x = self.ffn_norm(h)
        return h + self.down(F.silu(self.gate(x)) * self.up(x))

    def forward(self, h: Tensor) -> Tensor:
        """``h [B, T, D] -> [B, T, D]``, causal attention over all positions."""
        positions = torch.arange(h.shape[1], device=h.device)
        x = self.attn_input(h)
        q = self.project(self.wq, x, positions)
        k = self.project(self.wk, x, positions)
        v = self.project(self.wv, x)
        return self.finish(h, attention(q, k, v, is_causal=True))

    def forward_hard(self, h: Tensor, layout: HardLayout, context: Tensor | None) -> Tensor:
        """This layer on the hard tokens only: ``h [K, D] -> [K, D]``.

        ``context [B, T, D]`` (``"propagate"``): the states of every position (hard
        tokens' current states, exited tokens' exit-layer states), the source of the
        keys and values. ``None`` (``"routed"``): keys and values from ``h`` only.
        """
        if context is None:
            x = self.attn_input(h)
            q = layout.pad(self.project(self.wq, x, layout.positions))
            k = layout.pad(self.project(self.wk, x, layout.positions))
            v = layout.pad(self.project(self.wv, x))
            # Padding slots follow the hard tokens of their row, so causality over
            # slots keeps them out of every real query.
            attn = attention(q, k, v, is_causal=True)
        else:
            xc = self.attn_input(context)
            positions = torch.arange(layout.seq_len, device=xc.device)
            k = self.project(self.wk, xc, positions)
            v = self.project(self.wv, xc)
            x = ops.gather_tokens(xc, layout.plan)
            q = layout.pad(self.project(self.wq, x, layout.positions))
            attn = attention(q, k, v, attn_mask=layout.key_mask)
        return self.finish(h, layout.unpad(attn))


class ExitHead(nn.Module):
    """An exit's norm (``nn.RMSNorm`` / ``nn.LayerNorm``; ``None`` without
    ``config.exit_norm``) and output head ``[V, D]``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = make_norm(config) if config.exit_norm else None
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)

    def head_args(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(weight, norm_weight, norm_bias)`` as the ``lego_kernels.ops`` head ops take them
        (with ``norm=config.head_norm``)."""
        return (
            self.head.weight,
            getattr(self.norm, "weight", None),
            getattr(self.norm, "bias", None),
        )


@dataclasses.dataclass
class EarlyExitStats:
    """Cost of one ``early_exit`` call.

    ``exit_ratio``: share of tokens that exited; ``layer_cost``: layers run per token
    over the model's depth (the seed's count); ``flops``: analytic FLOPs of this call
    (exit heads included, see ``LegoModel.flops``); ``full_flops``: those of the
    full-depth forward; ``wall_time_s``: wall clock of the call (device synchronized);
    ``overflow``: hard tokens that exited because the capacity was full.

    With a ``capacity`` the call reads nothing back from the device, so what depends on
    the data stays there: ``exit_ratio`` and ``layer_cost`` are 0-d float32 tensors and
    ``overflow`` a 0-d int64 tensor on the device (read them with ``.item()`` when you
    want to wait; a replayed CUDA graph updates them); ``flops`` is a plain int, the work
    done on all ``capacity`` slots whether used or not; ``wall_time_s`` is the host's
    time in the call (on CUDA the launches only, as nothing is synchronized). Without a
    capacity every field is a Python number and ``overflow`` is 0. Inside
    ``torch.compile``, ``wall_time_s`` is NaN (time the compiled call instead).
    """

    exit_ratio: float | Tensor
    layer_cost: float | Tensor
    flops: int
    full_flops: int
    wall_time_s: float
    overflow: int | Tensor = 0

    @property
    def flops_cost(self) -> float:
        """``flops / full_flops``."""
        return self.flops / self.full_flops


class EarlyExitOutput(NamedTuple):
    """Result of ``LegoModel.early_exit`` for ``ids [B, T]``.

    ``prediction`` int64 ``[B, T]`` (from the exit each token used), ``confidence``
    float32 ``[B, T]`` (at the exit layer), ``exited`` bool ``[B, T]``
    (``confidence >= threshold``, or past the capacity), ``nll`` float32 ``[B, T]`` or
    ``None`` (without targets; 0 at ``ignore_index``), ``stats``.
    """

    prediction: Tensor
    confidence: Tensor
    exited: Tensor
    nll: Tensor | None
    stats: EarlyExitStats


def init_weights(module: nn.Module, config: ModelConfig) -> None:
    """Initialize ``module``'s own weight if it is a linear layer or an embedding, per
    ``config.init`` (``"normal"``: N(0, 0.02); ``"trunc_normal"``: linear layers from a
    truncated normal with std ``1/sqrt(dim)``, embeddings with std 0.02, cut at +-2 as
    ``nn.init.trunc_normal_`` does). Use as ``model.apply(partial(init_weights, config=c))``."""
    if not isinstance(module, (nn.Linear, nn.Embedding)):
        return
    if config.init == "normal":
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    else:
        std = 1.0 / math.sqrt(config.dim) if isinstance(module, nn.Linear) else 0.02
        nn.init.trunc_normal_(module.weight, std=std)


class LegoModel(nn.Module):
    """Decoder-only Transformer with an exit after every layer (see the module docstring).

    Layers are 1-indexed in every argument (``exit_layer``, ``start``, ``end``, ``k``),
    as in the configs. Token ids are int64 ``[B, T]`` with ``1 <= T <= max_seq_len``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        num_exits = config.num_layers if config.per_exit_heads else 1
        self.exits = nn.ModuleList(ExitHead(config) for _ in range(num_exits))
        self.apply(functools.partial(init_weights, config=config))

    # ------------------------------------------------------------------ validation

    def _check_layer(self, name: str, layer: int) -> None:
        num_layers = self.config.num_layers
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{name} must be an int layer number, got {layer!r}")
        if not 1 <= layer <= num_layers:
            raise ValueError(f"{name} must be in [1, {num_layers}] (1-indexed), got {layer}")

    def _check_ids(self, name: str, ids: Tensor) -> None:
        if not isinstance(ids, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"{name} must hold integer token ids (int64), got {ids.dtype}")
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"{name} must be a non-empty [batch, seq_len] tensor, got {ids.shape}")
        if ids.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"{name} has seq_len {ids.shape[1]} > max_seq_len {self.config.max_seq_len}; "
                "use shorter windows or a larger ModelConfig.max_seq_len"
            )
        # On the device (no synchronization, no graph break): see ops.check_range.
        ops.check_range(name, ids, self.config.vocab_size)

    def _check_states(self, h: Tensor) -> None:
        if not isinstance(h, Tensor) or h.dim() != 3 or h.shape[-1] != self.config.dim:
            shape = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(f"h must be [batch, seq_len, {self.config.dim}], got {shape}")

    def _exit(self, exit_layer: int | None) -> ExitHead:
        if exit_layer is None:
            exit_layer = self.config.num_layers
        self._check_layer("exit_layer", exit_layer)
        return self.exits[exit_layer - 1 if self.config.per_exit_heads else 0]

    # ------------------------------------------------------------------ dense path

    def embed(self, ids: Tensor) -> Tensor:
        """Token embeddings: ``ids`` int64 ``[B, T]`` -> ``[B, T, D]`` (parameter dtype)."""
        self._check_ids("ids", ids)
        return self.embedding(ids)

    def run_layers(self, h: Tensor, start: int, end: int) -> Tensor:
        """Layers ``start..end`` (1-indexed, inclusive) on all tokens: ``[B, T, D] -> [B, T, D]``.

        ``start = end + 1`` is an empty range and returns ``h``.
        """
        self._check_states(h)
        self._check_range(start, end)
        for block in self.layers[start - 1 : end]:
            h = block(h)
        return h

    def _check_range(self, start: int, end: int) -> None:
        self._check_layer("start", start)
        if end != start - 1:
            self._check_layer("end", end)
        if end < start - 1:
            raise ValueError(f"end ({end}) must be >= start - 1 ({start - 1})")

    def exit_logits(self, h: Tensor, exit_layer: int | None = None) -> Tensor:
        """Logits of the exit after ``exit_layer`` (default: last): ``[..., D] -> [..., V]``."""
        return ops.norm_head_logits(
            h,
            *self._exit(exit_layer).head_args(),
            norm=self.config.head_norm,
            eps=self.config.norm_eps,
        )

    def exit_loss(
        self,
        h: Tensor,
        targets: Tensor,
        *,
        exit_layer: int | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        token_weights: Tensor | None = None,
        return_confidence: bool = False,
        measure: str = "max_prob",
    ) -> Tensor | tuple[Tensor, ops.Confidence]:
        """Cross-entropy of that exit on ``h [..., D]``, ``targets`` int64 ``[...]``:
        ``ops.norm_head_cross_entropy`` with this exit's norm and head (same arguments)."""
        weight, norm_weight, norm_bias = self._exit(exit_layer).head_args()
        return ops.norm_head_cross_entropy(
            h,
            weight,
            targets,
            norm_weight,
            norm_bias,
            norm=self.config.head_norm,
            eps=self.config.norm_eps,
            ignore_index=ignore_index,
            reduction=reduction,
            token_weights=token_weights,
            return_confidence=return_confidence,
            measure=measure,
        )

    def exit_confidence(
        self, h: Tensor, *, exit_layer: int | None = None, measure: str = "max_prob"
    ) -> ops.Confidence:
        """``ops.exit_confidence`` of that exit on ``h [..., D]`` (each field ``[...]``)."""
        return ops.exit_confidence(
            h,
            *self._exit(exit_layer).head_args(),
            norm=self.config.head_norm,
            eps=self.config.norm_eps,
            measure=measure,
        )

    def forward(self, ids: Tensor, *, exit_layer: int | None = None) -> Tensor:
        """Logits ``[B, T, V]`` at the exit after ``exit_layer`` (default: the last layer)."""
        if exit_layer is None:
            exit_layer = self.config.num_layers
        self._check_layer("exit_layer", exit_layer)
        h = self.run_layers(self.embed(ids), 1, exit_layer)
        return self.exit_logits(h, exit_layer)

    # ------------------------------------------------------------------ routed path

    def _run_hard(
        self,
        h: Tensor,
        plan: ops.RoutePlan,
        start: int,
        end: int,
        context: str,
        width: int | None = None,
    ) -> tuple[Tensor, HardLayout]:
        """Layers ``start..end`` on the ``K >= 1`` slots of ``plan`` (free slots: zero rows).

        ``h [B, T, D]``: every token's state before layer ``start``; ``width``: that of
        ``HardLayout.build``. Returns the slots' states after layer ``end``, ``[K, D]``,
        and their layout.
        """
        batch_size, seq_len, _ = h.shape
        layout = HardLayout.build(plan, batch_size, seq_len, context, width)
        hard = ops.gather_tokens(h, plan)
        for block in self.layers[start - 1 : end]:
            states = ops.scatter_tokens(h, hard, plan) if context == "propagate" else None
            hard = block.forward_hard(hard, layout, states)
        return hard, layout

    def run_layers_routed(
        self, h: Tensor, hard: Tensor, start: int, end: int, *, context: str = "propagate"
    ) -> Tensor:
        """Layers ``start..end`` (1-indexed, inclusive) on the hard tokens only.

        ``h [B, T, D]``: the states entering layer ``start`` (the exit-layer states);
        ``hard`` bool ``[B, T]``: the tokens that continue. Returns ``[B, T, D]``:
        hard tokens' states after layer ``end``, other tokens' ``h`` unchanged.
        Queries, attention output and FFN run on the gathered hard rows; keys and
        values come from every position (``context="propagate"``, exited tokens from
        their state in ``h``) or from the hard tokens only (``"routed"``). Equals
        running every layer on all tokens and keeping exited tokens frozen with
        ``where(hard, new, old)``, with keys masked as the context says.
        Differentiable w.r.t. ``h`` and the layers' parameters.
        """
        self._check_states(h)
        self._check_range(start, end)
        ops.check_choice("context", context, CONTEXTS)
        if not isinstance(hard, Tensor) or hard.dtype != torch.bool:
            got = hard.dtype if isinstance(hard, Tensor) else type(hard).__name__
            raise TypeError(f"hard must be a bool tensor [batch, seq_len], got {got}")
        if hard.shape != h.shape[:-1] or hard.device != h.device:
            raise ValueError(
                f"hard must be [batch, seq_len] = {tuple(h.shape[:-1])} on {h.device}, "
                f"got {tuple(hard.shape)} on {hard.device}"
            )
        # route() keeps the tokens with confidence < threshold: give hard ones 0, others 1.
        plan = ops.route((~hard).float(), 0.5)
        if plan.indices.numel() == 0 or end < start:
            return h
        states, _ = self._run_hard(h, plan, start, end, context)
        return ops.scatter_tokens(h, states, plan)

    @torch.no_grad()
    def early_exit(
        self,
        ids: Tensor,
        *,
        exit_layer: int,
        threshold: float,
        context: str = "propagate",
        measure: str = "max_prob",
        targets: Tensor | None = None,
        capacity: int | None = None,
    ) -> EarlyExitOutput:
        """Two-stage inference: tokens confident at ``exit_layer`` exit there, the others
        run the deeper layers (on the hard tokens only) to the last exit.

        ``ids`` int64 ``[B, T]``; ``exit_layer`` in ``[1, num_layers - 1]``; a token exits
        when its ``measure`` confidence is ``>= threshold`` (0: all exit, equal to
        ``forward(ids, exit_layer=exit_layer)``; above 1: none does, equal to
        ``forward(ids)``). ``targets`` int64 ``[B, T]`` (optional, -100 ignored) give
        ``nll``. The exit head runs once on all tokens (confidence, and the loss from
        the same pass); the final head runs on the hard tokens only. No gradient.

        ``capacity``: a fixed number of hard slots per call. The first ``capacity`` hard
        tokens (in flat order ``b * T + t``) run the deeper layers, those past it exit at
        ``exit_layer`` too (``stats.overflow`` counts them); the deeper layers always
        run ``capacity`` rows. Every shape is then static and the call makes no host
        synchronization, so it can be captured in a CUDA graph (``stats`` then holds
        device tensors, see ``EarlyExitStats``). ``None``: room for every hard token
        (the host reads their number and the padding width).
        """
        self._check_ids("ids", ids)
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, int):
            raise TypeError(f"exit_layer must be an int layer number, got {exit_layer!r}")
        num_layers = self.config.num_layers
        if not 1 <= exit_layer < num_layers:
            raise ValueError(
                f"exit_layer must be in [1, {num_layers - 1}] (below the last layer), "
                f"got {exit_layer}"
            )
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a float, got {type(threshold).__name__}")
        if math.isnan(threshold):
            raise ValueError("threshold is NaN; pass a number (0: all tokens exit, > 1: none)")
        ops.check_choice("context", context, CONTEXTS)
        if targets is not None and (not isinstance(targets, Tensor) or targets.shape != ids.shape):
            raise ValueError(f"targets must be a tensor shaped like ids {tuple(ids.shape)}")
        if capacity is not None:
            if isinstance(capacity, bool) or not isinstance(capacity, int):
                raise TypeError(f"capacity must be an int or None, got {type(capacity).__name__}")
            if capacity < 0:
                raise ValueError(f"capacity must be >= 0 (hard slots per call), got {capacity}")
        batch_size, seq_len = ids.shape
        num_tokens = ids.numel()
        synchronize = ids.is_cuda and capacity is None  # with a capacity, nothing waits
        if synchronize:
            torch.cuda.synchronize(ids.device)
        start = _clock()

        h = self.run_layers(self.embedding(ids), 1, exit_layer)
        nll = None
        if targets is None:
            conf = self.exit_confidence(h, exit_layer=exit_layer, measure=measure)
        else:
            nll, conf = self.exit_loss(
                h,
                targets,
                exit_layer=exit_layer,
                reduction="none",
                return_confidence=True,
                measure=measure,
            )
        plan = ops.route(conf.confidence, threshold, capacity=capacity)
        index = plan.indices
        slots = index.numel()  # the hard tokens, or the capacity
        prediction = conf.prediction
        in_plan = put_rows(ids.new_zeros(num_tokens, dtype=torch.bool), index, index >= 0)
        flops = self.flops(batch_size, seq_len, depth=exit_layer)
        if slots > 0:
            width = None if capacity is None else min(capacity, seq_len)
            states, layout = self._run_hard(h, plan, exit_layer + 1, num_layers, context, width)
            if targets is None:
                deep = self.exit_confidence(states, measure=measure)
            else:
                deep_nll, deep = self.exit_loss(
                    states,
                    take_rows(targets.reshape(-1), index),
                    reduction="none",
                    return_confidence=True,
                    measure=measure,
                )
                nll = put_rows(nll.reshape(-1), index, deep_nll).view_as(ids)
            prediction = put_rows(prediction.reshape(-1), index, deep.prediction).view_as(ids)
            if context == "propagate":
                kv_tokens, score_entries = num_tokens, batch_size * layout.width * seq_len
            else:
                kv_tokens, score_entries = slots, batch_size * layout.width**2
            deep_layer = self._layer_flops(slots, kv_tokens, score_entries)
            flops += (num_layers - exit_layer) * deep_layer + self._head_flops(slots)

        # Hard tokens that ran deeper: a number, or (capacity) a 0-d tensor on the device.
        num_hard = slots if capacity is None else plan.count.clamp(max=capacity)
        if synchronize:
            torch.cuda.synchronize(ids.device)
        stats = EarlyExitStats(
            exit_ratio=1.0 - num_hard / num_tokens,
            layer_cost=(exit_layer * num_tokens + (num_layers - exit_layer) * num_hard)
            / (num_layers * num_tokens),
            flops=flops,
            full_flops=self.flops(batch_size, seq_len),
            wall_time_s=_clock() - start,
            overflow=0 if capacity is None else plan.count - num_hard,
        )
        exited = ~in_plan.view_as(ids)
        return EarlyExitOutput(prediction, conf.confidence, exited, nll, stats)

    # ------------------------------------------------------------------ generation

    def generate(self, ids: Tensor, **settings: Any) -> GenerationOutput:
        """Continue the prompts ``ids`` int64 ``[B, T]`` with a KV cache:
        ``lego.generation.generate(self, ids, **settings)``, whose keywords are
        ``max_new_tokens``, ``mode`` (``"full"``, ``"early-exit"``, ``"self-speculative"``),
        ``exit_layer``, ``threshold``, ``measure``, ``context``, ``draft_tokens``,
        ``temperature``, ``top_k``, ``top_p``, ``eos_id``, ``attention_mask``, ``generator``,
        ``capacity``."""
        from lego.generation import generate  # lego.generation builds on this module

        return generate(self, ids, **settings)

    # ------------------------------------------------------------------ growth and freezing

    def extend(self, num_layers: int) -> None:
        """Append freshly initialized layers on top, up to ``num_layers`` in all (ASHEM
        phase 2); with per-exit heads each new layer gets a fresh exit too. Existing
        weights are untouched; ``self.config.num_layers`` is updated."""
        current = self.config.num_layers
        if isinstance(num_layers, bool) or not isinstance(num_layers, int):
            raise TypeError(f"num_layers must be an int, got {num_layers!r}")
        if num_layers <= current:
            raise ValueError(
                f"num_layers must exceed the current {current} layers, got {num_layers}"
            )
        config = dataclasses.replace(self.config, num_layers=num_layers)
        like = self.embedding.weight
        new_layers = nn.ModuleList(Block(config) for _ in range(num_layers - current))
        new_modules = [new_layers]
        if config.per_exit_heads:
            new_exits = nn.ModuleList(ExitHead(config) for _ in range(num_layers - current))
            new_modules.append(new_exits)
            self.exits.extend(new_exits.to(device=like.device, dtype=like.dtype))
        for module in new_modules:
            module.apply(functools.partial(init_weights, config=config))
        self.layers.extend(new_layers.to(device=like.device, dtype=like.dtype))
        self.config = config

    def freeze_lower(self, k: int, *, head: bool = False) -> None:
        """Set ``requires_grad=False`` on the embedding and layers ``1..k`` (with per-exit
        heads, also on the exits of layers ``1..k``); ``head=True`` also freezes every exit
        norm + head, the shared one included (so earlier exits keep their predictions).
        Nothing is unfrozen: parameters frozen before stay frozen."""
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int number of layers, got {k!r}")
        if not 0 <= k <= self.config.num_layers:
            raise ValueError(f"k must be in [0, {self.config.num_layers}], got {k}")
        frozen = [self.embedding, *self.layers[:k]]
        if head:
            frozen += list(self.exits)
        elif self.config.per_exit_heads:
            frozen += list(self.exits[:k])
        for module in frozen:
            module.requires_grad_(False)

    # ------------------------------------------------------------------ FLOPs

    def _layer_flops(self, query_tokens: int, kv_tokens: int, score_entries: int) -> int:
        """One layer: attention norm and K/V projections on ``kv_tokens``; Q/O projections,
        FFN norm and SwiGLU on ``query_tokens``; ``QK^T`` and ``PV`` over ``score_entries``
        (query, key) pairs, all heads together."""
        dim, hidden = self.config.dim, self.config.hidden_dim
        norm = NORM_FLOPS_PER_ELEMENT * dim
        kv = kv_tokens * (norm + 2 * (2 * dim * dim))
        query = query_tokens * (2 * (2 * dim * dim) + norm + 3 * (2 * dim * hidden))
        return kv + query + score_entries * 2 * (2 * dim)

    def _head_flops(self, tokens: int) -> int:
        """An exit on ``tokens``: its norm (if any) and the ``[D] x [D, V]`` head GEMM."""
        dim = self.config.dim
        norm = NORM_FLOPS_PER_ELEMENT * dim if self.config.exit_norm else 0
        return tokens * (norm + 2 * dim * self.config.vocab_size)

    def flops(
        self, batch: int, seq_len: int, *, depth: int | None = None, head_tokens: int | None = None
    ) -> int:
        """Analytic forward FLOPs of ``depth`` layers (default: all) on ``batch x seq_len``
        tokens plus one exit head on ``head_tokens`` tokens (default: all of them).

        Conventions: a matmul counts 2 FLOPs per multiply-add (Q/K/V/O projections,
        SwiGLU's three GEMMs, the head GEMM); attention counts the dense ``T x T`` score
        and value products of each sequence, as SDPA's math path computes them (what
        ``FlopCounterMode`` reports; causal flash kernels skip about half); every norm
        (two per layer, one per exit) counts ``4 * D`` per token; the embedding lookup,
        RoPE, softmax, SiLU and residual adds are not counted (O(T * D) each).
        """
        for name, value in (("batch", batch), ("seq_len", seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        num_tokens = batch * seq_len
        depth = self.config.num_layers if depth is None else depth
        head_tokens = num_tokens if head_tokens is None else head_tokens
        if not 0 <= depth <= self.config.num_layers:
            raise ValueError(f"depth must be in [0, {self.config.num_layers}], got {depth}")
        if not 0 <= head_tokens <= num_tokens:
            raise ValueError(f"head_tokens must be in [0, {num_tokens}], got {head_tokens}")
        layer = self._layer_flops(num_tokens, num_tokens, batch * seq_len * seq_len)
        return depth * layer + self._head_flops(head_tokens)
