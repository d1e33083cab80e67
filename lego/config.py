"""Configuration dataclasses for LEGO models, stage training and ASHEM.

Every config is a frozen dataclass validated at construction: a bad value raises
``ValueError`` (or ``TypeError`` for a wrong type) whose message names the field
and says what it must be. Layers are 1-indexed and ranges are inclusive, as in
the seed: ``StageConfig(layers=(1, 2))`` is the block of the first two layers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lego.exit_loss import LOSS_SCALES, loss_scales

NORMS = ("rms", "layer")
NORM_POSITIONS = ("pre", "post")
INITS = ("normal", "trunc_normal")
# Model variants by name (``--arch``): the ``ModelConfig`` fields each one sets.
# ``"seed"`` is the original research code's block: post-norm, no norm before the
# head, SwiGLU width 4 x dim, truncated-normal init with std 1/sqrt(dim).
ARCHS = ("lego", "seed")
# How a stage's layer range carries loss: at its end layer only, or at every layer.
STAGE_LOSSES = ("end", "every")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_positive(name: str, value: object) -> None:
    if _check_float(name, value) <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only Transformer (RoPE attention, SwiGLU FFN).

    ``hidden_dim`` is the SwiGLU width; ``None`` picks ``8/3 * dim`` rounded up to
    a multiple of 8 (stored back into the field, so ``asdict`` shows the width used).
    ``per_exit_heads=True`` gives every layer its own exit norm + head; otherwise
    one final norm + head is shared by every exit.

    The block variant: ``norm_position="pre"`` (default) normalizes each sublayer's
    input (``h + f(norm(h))``), ``"post"`` its residual sum (``norm(h + f(h))``);
    ``exit_norm=False`` feeds the exit heads the states without a norm;
    ``init="normal"`` draws every weight from N(0, 0.02), ``"trunc_normal"`` the linear
    layers (head included) from a truncated normal with std ``1/sqrt(dim)`` and the
    embedding with std 0.02 (the original code's). :func:`arch_fields` names the sets.
    """

    vocab_size: int
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_seq_len: int = 512
    hidden_dim: int | None = None
    norm: str = "rms"
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    per_exit_heads: bool = False
    norm_position: str = "pre"
    exit_norm: bool = True
    init: str = "normal"

    def __post_init__(self) -> None:
        _check_int("vocab_size", self.vocab_size, 1)
        _check_int("dim", self.dim, 1)
        _check_int("num_layers", self.num_layers, 1)
        _check_int("num_heads", self.num_heads, 1)
        _check_int("max_seq_len", self.max_seq_len, 1)
        if self.dim % self.num_heads != 0:
            raise ValueError(
                f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads}); "
                "pick num_heads among the divisors of dim"
            )
        if (self.dim // self.num_heads) % 2 != 0:
            raise ValueError(
                f"dim / num_heads must be even for rotary embeddings, got "
                f"{self.dim} / {self.num_heads} = {self.dim // self.num_heads}"
            )
        if self.hidden_dim is None:
            object.__setattr__(self, "hidden_dim", 8 * math.ceil(self.dim / 3))
        _check_int("hidden_dim", self.hidden_dim, 1)
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        _check_positive("norm_eps", self.norm_eps)
        _check_positive("rope_base", self.rope_base)
        if not isinstance(self.per_exit_heads, bool):
            raise TypeError(f"per_exit_heads must be a bool, got {self.per_exit_heads!r}")
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(
                f"norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}"
            )
        if not isinstance(self.exit_norm, bool):
            raise TypeError(f"exit_norm must be a bool, got {self.exit_norm!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def head_norm(self) -> str | None:
        """The norm the exits apply before their head, as ``lego_kernels.ops`` takes it:
        ``norm``, or ``None`` when ``exit_norm`` is off."""
        return self.norm if self.exit_norm else None


def arch_fields(arch: str, dim: int) -> dict[str, object]:
    """The ``ModelConfig`` fields of the model variant ``arch`` (one of ``ARCHS``) at
    width ``dim``: ``{}`` for ``"lego"`` (the defaults), the original code's block for
    ``"seed"``."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if arch == "lego":
        return {}
    return {
        "norm_position": "post",
        "exit_norm": False,
        "hidden_dim": 4 * dim,
        "init": "trunc_normal",
    }


@dataclass(frozen=True)
class StageConfig:
    """A contiguous block of layers ``(start, end)`` (1-indexed, inclusive) with an
    exit after ``end`` whose loss is weighted by ``loss_weight`` (0 = no loss there)."""

    layers: tuple[int, int]
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.layers, (tuple, list)) or len(self.layers) != 2:
            raise TypeError(f"layers must be a pair (start, end), got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(self.layers))
        start, end = self.layers
        _check_int("layers[0] (start)", start, 1)
        _check_int("layers[1] (end)", end, 1)
        if end < start:
            raise ValueError(f"layers must be (start, end) with start <= end, got {self.layers}")
        if _check_float("loss_weight", self.loss_weight) < 0:
            raise ValueError(f"loss_weight must be >= 0, got {self.loss_weight}")


def parse_stages(text: str) -> tuple[StageConfig, ...]:
    """Stages from ``"START-END:WEIGHT,..."`` (1-indexed, inclusive; ``"3"`` is the range
    ``3-3``; the weight defaults to 1), e.g. ``"1-2:0.3,3-4:1.0"``. ``ValueError`` naming
    ``--stages`` and the bad part otherwise (ascending order is ``TrainingConfig``'s
    check)."""
    stages = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:-(\d+))?(?::([^,]+))?\s*", part)
        if match is None:
            raise ValueError(f"--stages: {part!r} is not START-END:WEIGHT (e.g. 1-2:0.3,3-4:1.0)")
        start, end, weight = match.groups()
        try:
            loss_weight = float(weight) if weight is not None else 1.0
            stages.append(StageConfig((int(start), int(end or start)), loss_weight))
        except (TypeError, ValueError) as e:
            raise ValueError(f"--stages: {part.strip()!r}: {e}") from None
    return tuple(stages)


@dataclass(frozen=True)
class TrainingConfig:
    """Stages (ascending, non-overlapping) and the early-exit routing setting.

    A token whose exit confidence at ``exit_layer`` is at least
    ``routing_threshold`` exits there; ``routing_threshold = 0`` turns routing off.
    ``stages`` may be given as a list; it is stored as a tuple.

    Where the loss is (``layer_weights``): ``stage_loss="end"`` (default) puts one exit
    loss after each stage's end layer; ``"every"`` one after every layer of each stage's
    range, each with the stage's weight (the original code's ``StageConfig((s, e))``).
    ``loss_scale`` (one of ``lego.exit_loss.LOSS_SCALES``, or ``None``) multiplies the
    weight of each exit below the model's last layer by that depth scale (torchtune's
    early-exit loss: the scales of those exits sum to 1).
    """

    stages: tuple[StageConfig, ...]
    routing_threshold: float = 0.0
    exit_layer: int = 1
    stage_loss: str = "end"
    loss_scale: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.stages, (tuple, list)) or len(self.stages) == 0:
            raise ValueError(f"stages must be a non-empty list of StageConfig, got {self.stages!r}")
        object.__setattr__(self, "stages", tuple(self.stages))
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, StageConfig):
                raise TypeError(f"stages[{i}] must be a StageConfig, got {type(stage).__name__}")
        for i in range(1, len(self.stages)):
            previous, stage = self.stages[i - 1].layers, self.stages[i].layers
            if stage[0] <= previous[1]:
                raise ValueError(
                    f"stages must be ascending and non-overlapping: stages[{i}] = {stage} "
                    f"starts at or before the end of stages[{i - 1}] = {previous}"
                )
        if all(stage.loss_weight == 0 for stage in self.stages):
            raise ValueError("stages: at least one loss_weight must be > 0, all are 0")
        threshold = _check_float("routing_threshold", self.routing_threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"routing_threshold must be in [0, 1], got {threshold}")
        _check_int("exit_layer", self.exit_layer, 1)
        if self.stage_loss not in STAGE_LOSSES:
            raise ValueError(f"stage_loss must be one of {STAGE_LOSSES}, got {self.stage_loss!r}")
        if self.loss_scale is not None and self.loss_scale not in LOSS_SCALES:
            raise ValueError(
                f"loss_scale must be None or one of {LOSS_SCALES}, got {self.loss_scale!r}"
            )

    @property
    def exit_layers(self) -> tuple[int, ...]:
        """The end layer of each stage, ascending."""
        return tuple(stage.layers[1] for stage in self.stages)

    def layer_weights(self, num_layers: int) -> tuple[tuple[int, float], ...]:
        """``(layer, weight)`` of every exit that the stages put a loss on, ascending,
        zero weights included (the general path computes them), for a model of
        ``num_layers`` layers (see the class docstring for ``stage_loss`` and
        ``loss_scale``)."""
        self.check_model(num_layers)
        if self.stage_loss == "end":
            pairs = [(stage.layers[1], stage.loss_weight) for stage in self.stages]
        else:
            pairs = [
                (layer, stage.loss_weight)
                for stage in self.stages
                for layer in range(stage.layers[0], stage.layers[1] + 1)
            ]
        if self.loss_scale is None:
            return tuple(pairs)
        exits = [layer for layer, weight in pairs if layer < num_layers and weight > 0]
        scale = dict(zip(exits, loss_scales(self.loss_scale, exits, num_layers), strict=True))
        return tuple((layer, weight * scale.get(layer, 1.0)) for layer, weight in pairs)

    def check_model(self, num_layers: int) -> None:
        """Raise ``ValueError`` if a stage or ``exit_layer`` lies beyond ``num_layers``."""
        _check_int("num_layers", num_layers, 1)
        last = self.stages[-1].layers
        if last[1] > num_layers:
            raise ValueError(
                f"stages: stage {last} ends beyond the model's {num_layers} layers; "
                f"end the last stage at or below layer {num_layers}"
            )
        if self.exit_layer > num_layers:
            raise ValueError(
                f"exit_layer ({self.exit_layer}) lies beyond the model's {num_layers} layers"
            )

    def plain_path(self, num_layers: int) -> bool:
        """True when the only stage with loss ends at the last layer and routing is off,
        so training needs no intermediate exit (the seed's "automatic optimization")."""
        with_loss = [layer for layer, weight in self.layer_weights(num_layers) if weight > 0]
        return with_loss == [num_layers] and self.routing_threshold == 0


@dataclass(frozen=True)
class ASHEMConfig:
    """ASHEM settings; the defaults are the seed's.

    Phase 1 trains ``phase1_layers`` on all data (early stopping with
    ``phase1_patience``); the ``hard_example_ratio`` quantile of exit confidence
    becomes the threshold; phase 2 grows the model to ``phase2_layers`` and trains
    the new layers on the hard tokens.
    """

    phase1_layers: int = 2
    phase1_lr: float = 1e-3
    phase1_patience: int = 1
    hard_example_ratio: float = 0.5
    phase2_layers: int = 4
    phase2_lr: float = 1e-4
    phase2_patience: int = 3

    def __post_init__(self) -> None:
        _check_int("phase1_layers", self.phase1_layers, 1)
        _check_positive("phase1_lr", self.phase1_lr)
        _check_int("phase1_patience", self.phase1_patience, 0)
        ratio = _check_float("hard_example_ratio", self.hard_example_ratio)
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"hard_example_ratio must be in (0, 1), got {ratio}")
        _check_int("phase2_layers", self.phase2_layers, 1)
        if self.phase2_layers <= self.phase1_layers:
            raise ValueError(
                f"phase2_layers ({self.phase2_layers}) must be greater than "
                f"phase1_layers ({self.phase1_layers})"
            )
        _check_positive("phase2_lr", self.phase2_lr)
        _check_int("phase2_patience", self.phase2_patience, 0)
