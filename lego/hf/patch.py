"""``apply_lego``: the fused loss and LEGO exits inside a Hugging Face causal LM.

After ``patch = apply_lego(model, exit_layers=(2, 4))``, a call with labels,
``model(input_ids, labels=labels, attention_mask=...)``, runs the model's own decoder
(``model.model`` / ``model.transformer``, so its masks, caches, gradient checkpointing
and attention kernels are untouched) and takes, through forward pre-hooks:

- the input of the final norm, i.e. the *pre-norm* last hidden state (in transformers
  5 ``hidden_states[-1]`` is already normalized: passing it to a norm + head op would
  normalize twice), and
- for each exit ``l`` (1-based), the output of layer ``l`` (the input of ``layers[l]``).

Each of them goes through the model's shared final norm (its own kind, weights and
eps: RMSNorm for Llama/Mistral/Qwen2, LayerNorm with bias for GPT-2) and head
(tied or not) in ``lego_kernels.ops.norm_head_cross_entropy``, so no ``tokens x
vocab`` logits exist, and the output's ``logits`` is ``None``. The loss is the
model's own (``transformers``' ``ForCausalLMLoss``): labels shifted left by one
(the last position padded with ``ignore_index``, or ``shift_labels=`` given as is),
``ignore_index=-100``, the mean over counted tokens, or the sum divided by
``num_items_in_batch`` when the ``Trainer`` passes it (gradient accumulation). One
difference: a batch whose labels are all ignored gives 0, not NaN. With exits::

    loss = final + sum_l scale_l * exit_l      (``lego.exit_loss``: torchtune's scales)

and ``outputs.exit_losses`` maps each computed exit ``l``, and the last layer, to its
own loss. Without labels the patched forward is the original one (logits as before).

The curriculum's step counter lives on the :class:`LegoPatch`: ``patch.step``
(0-based) is the step a training-mode forward with labels uses; each such forward
then advances it by one (``patch.count_steps``). ``"gradual"`` also needs
``patch.total_steps`` (``apply_lego(..., total_steps=N)``). With the Hugging Face
``Trainer`` pass ``callbacks=[patch.trainer_callback()]``: it sets ``total_steps`` to
the run's ``max_steps`` and ``step`` to the optimizer step (``state.global_step``) at
each step's start, and stops the per-forward count, so the micro-batches of one
accumulated step share their exits. In eval mode every exit is computed and the
counter does not move.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import transformers
from torch import Tensor, nn
from torch.nn import functional as F
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from lego.exit_loss import active_exits, check_curriculum, check_exit_layers, loss_scales
from lego.hf.adapter import Adapter, Head
from lego.hf.modeling_gpt2 import GPT2Layout
from lego.hf.modeling_llama import LlamaLayout
from lego_kernels import ops
from lego_kernels.reference import Confidence

ADAPTERS: tuple[Adapter, ...] = (LlamaLayout(), GPT2Layout())
SUPPORTED = tuple(name for adapter in ADAPTERS for name in adapter.model_classes)
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def find_adapter(model: object) -> Adapter:
    """The :class:`Adapter` of ``model``'s family; ``TypeError`` naming the supported classes."""
    for adapter in ADAPTERS:
        if any(isinstance(model, getattr(transformers, name)) for name in adapter.model_classes):
            head = model.get_output_embeddings()
            if getattr(head, "bias", None) is not None:
                raise TypeError(
                    f"{type(model).__name__} has an output head with a bias, which the fused "
                    "norm + head ops do not take; lego.hf supports bias-free heads only"
                )
            return adapter
    raise TypeError(
        f"lego.hf supports {', '.join(SUPPORTED)} (and their subclasses), got "
        f"{type(model).__name__}; see CONTRIBUTING.md, 'Adding a Hugging Face model family'"
    )


def cast_head(head: Head, dtype: torch.dtype) -> Head:
    """``head`` with its tensors in ``dtype`` (differentiable casts; mixed precision)."""
    if head.weight.dtype == dtype and head.norm_weight.dtype == dtype:
        return head
    bias = None if head.norm_bias is None else head.norm_bias.to(dtype)
    return head._replace(
        norm_weight=head.norm_weight.to(dtype), norm_bias=bias, weight=head.weight.to(dtype)
    )


def causal_lm_loss(
    hidden: Tensor,
    labels: Tensor | None,
    head: Head,
    *,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
) -> Tensor:
    """``transformers``' causal-LM loss of pre-norm states ``hidden [B, T, D]``, fused.

    ``labels [B, T]`` (int64) are shifted left by one, the last position padded with
    ``ignore_index``, unless ``shift_labels [B, T]`` is given. Mean over the counted
    tokens, or their sum divided by ``num_items_in_batch``. Float32 scalar.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    head = cast_head(head, hidden.dtype)
    args = (hidden, head.weight, shift_labels.to(hidden.device), head.norm_weight, head.norm_bias)
    kwargs = {"norm": head.norm, "eps": head.eps, "ignore_index": ignore_index}
    if num_items_in_batch is None:
        return ops.norm_head_cross_entropy(*args, **kwargs)
    total = ops.norm_head_cross_entropy(*args, **kwargs, reduction="sum")
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class _Captured(Exception):
    """Raised by a capturing hook to stop a forward once it has what it needs."""


@contextlib.contextmanager
def capture_inputs(modules: dict[object, nn.Module], *, stop: bool = False) -> Iterator[dict]:
    """Record the hidden-state input of each of ``modules`` (key -> module) while active.

    Yields the dict the inputs land in. With ``stop=True`` the forward is aborted as
    soon as every input is recorded (the layers above are not run).
    """
    inputs: dict[object, Tensor] = {}

    def hook(key: object, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs[key] = args[0] if args else kwargs["hidden_states"]
        if stop and len(inputs) == len(modules):
            raise _Captured

    handles = [
        module.register_forward_pre_hook(functools.partial(hook, key), with_kwargs=True)
        for key, module in modules.items()
    ]
    try:
        with contextlib.suppress(_Captured):
            yield inputs
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class LegoCausalLMOutput(CausalLMOutputWithCrossAttentions):
    """The model's own output fields (``logits`` ``None`` when labels were given), and
    ``exit_losses``: ``{layer: float32 loss}`` for each exit computed and the last layer."""

    exit_losses: dict[int, Tensor] | None = None


def _check_total_steps(total_steps: object) -> None:
    if total_steps is not None and (
        isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
    ):
        raise ValueError(f"total_steps must be None or an int >= 1, got {total_steps!r}")


class LegoPatch:
    """The state of one patched model; :func:`apply_lego` makes it.

    Attributes: ``model``, ``exit_layers`` (sorted, 1-based), ``scales`` (one per exit),
    ``curriculum``, ``step`` (the curriculum's 0-based step), ``total_steps``,
    ``count_steps`` (whether each training-mode forward with labels advances ``step``).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        exit_layers: tuple[int, ...],
        scales: tuple[float, ...],
        curriculum: str | None,
        total_steps: int | None,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.exit_layers = exit_layers
        self.scales = scales
        self.curriculum = curriculum
        self.step = 0
        self.total_steps = total_steps
        self.count_steps = True
        self.num_layers = len(adapter.layers(model))
        self._saved_forward = model.__dict__.get("forward")
        original = model.forward
        signature = inspect.signature(original)
        self._var_keyword = next(
            (p.name for p in signature.parameters.values() if p.kind == p.VAR_KEYWORD), None
        )

        @functools.wraps(original)
        def forward(*args: object, **kwargs: object) -> object:
            bound = signature.bind(*args, **kwargs)
            if bound.arguments.get("labels") is None:
                return original(*args, **kwargs)
            return self._forward_with_labels(bound.arguments)

        model.forward = forward
        model._lego_patch = self

    def remove(self) -> None:
        """Restore the model's original forward (a second call does nothing)."""
        if getattr(self.model, "_lego_patch", None) is not self:
            return
        if self._saved_forward is None:
            del self.model.forward
        else:
            self.model.forward = self._saved_forward
        del self.model._lego_patch

    def trainer_callback(self) -> transformers.TrainerCallback:
        """A ``transformers.TrainerCallback`` that drives the curriculum by optimizer step."""
        return LegoCurriculumCallback(self)

    def _exits_now(self) -> tuple[int, ...]:
        """The exits of this forward (all of them in eval mode); advances the step."""
        if not self.model.training:
            return self.exit_layers
        if self.curriculum == "gradual" and self.total_steps is None:
            raise ValueError(
                "curriculum='gradual' needs total_steps: pass apply_lego(..., total_steps=N), "
                "set patch.total_steps, or train with callbacks=[patch.trainer_callback()]"
            )
        exits = active_exits(
            self.curriculum, self.exit_layers, self.num_layers, self.step, self.total_steps or 1
        )
        if self.count_steps:
            self.step += 1
        return exits

    def _forward_with_labels(self, arguments: dict) -> LegoCausalLMOutput | tuple:
        arguments = dict(arguments)
        kwargs = arguments.pop(self._var_keyword, {}) if self._var_keyword else {}
        labels = arguments.pop("labels")
        arguments.pop("logits_to_keep", None)
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.model.config, "return_dict", True)
        loss_kwargs = {name: kwargs.pop(name) for name in LOSS_KWARGS if name in kwargs}
        exits = self._exits_now()
        layers = self.adapter.layers(self.model)
        watched = {"final": self.adapter.final_norm(self.model)}
        watched.update({layer: layers[layer] for layer in exits})
        with capture_inputs(watched) as states:
            outputs = self.adapter.decoder(self.model)(**arguments, **kwargs)
        head = self.adapter.head(self.model)
        final = causal_lm_loss(states["final"], labels, head, **loss_kwargs)
        losses = {
            layer: causal_lm_loss(states[layer], labels, head, **loss_kwargs) for layer in exits
        }
        loss = final
        for layer in exits:
            loss = loss + self.scales[self.exit_layers.index(layer)] * losses[layer]
        losses[self.num_layers] = final
        out = LegoCausalLMOutput(
            loss=loss,
            logits=None,
            cache=getattr(outputs, "cache", None),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
            cross_attentions=getattr(outputs, "cross_attentions", None),
            exit_losses=losses,
        )
        return out if return_dict else out.to_tuple()


class LegoCurriculumCallback(transformers.TrainerCallback):
    """Keeps ``patch.step`` on the ``Trainer``'s optimizer step (see the module docstring)."""

    def __init__(self, patch: LegoPatch) -> None:
        self.patch = patch

    def on_train_begin(self, args: object, state: object, control: object, **kwargs: object):
        self.patch.count_steps = False
        self.patch.total_steps = state.max_steps

    def on_step_begin(self, args: object, state: object, control: object, **kwargs: object):
        self.patch.step = state.global_step


def _check_exit_weights(exit_weights: object, exit_layers: Sequence[int]) -> tuple[float, ...]:
    """``exit_weights`` as floats in the order of ``sorted(exit_layers)``."""
    if isinstance(exit_weights, (str, bytes)) or not isinstance(exit_weights, Sequence):
        raise TypeError(
            f"exit_weights must be a sequence of numbers, one per exit layer, got "
            f"{type(exit_weights).__name__}"
        )
    if len(exit_weights) != len(exit_layers):
        raise ValueError(
            f"exit_weights has {len(exit_weights)} values but exit_layers has "
            f"{len(exit_layers)}; give one weight per exit layer, in the same order"
        )
    for weight in exit_weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"exit_weights must hold numbers, got {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"exit_weights must be finite and >= 0, got {weight!r}")
    by_layer = dict(zip(exit_layers, exit_weights, strict=True))
    return tuple(float(by_layer[layer]) for layer in sorted(exit_layers))


def apply_lego(
    model: nn.Module,
    *,
    exit_layers: Sequence[int] = (),
    exit_loss_scale: str = "uniform",
    exit_weights: Sequence[float] | None = None,
    curriculum: str | None = None,
    total_steps: int | None = None,
) -> LegoPatch:
    """Patch a Hugging Face causal LM in place (see the module docstring); returns the
    :class:`LegoPatch` whose ``remove()`` restores the original forward.

    ``exit_layers``: 1-based layers below the last whose output gets an exit through
    the shared final norm and head. ``exit_loss_scale``: the name of the depth scales
    (``lego.exit_loss.LOSS_SCALES``), or ``exit_weights``: one weight per exit, in the
    order of ``exit_layers``. ``curriculum``: ``None``, ``"rotational"`` or
    ``"gradual"``; ``total_steps``: the training steps ``"gradual"`` spreads over.
    """
    adapter = find_adapter(model)
    if getattr(model, "_lego_patch", None) is not None:
        raise ValueError("model is already patched by lego.hf; call patch.remove() first")
    num_layers = len(adapter.layers(model))
    layers = check_exit_layers(exit_layers, num_layers)
    scales = loss_scales(exit_loss_scale, layers, num_layers)
    if exit_weights is not None:
        if exit_loss_scale != "uniform":
            raise ValueError(
                "give either exit_loss_scale or exit_weights, not both "
                f"(got exit_loss_scale={exit_loss_scale!r} and exit_weights)"
            )
        scales = _check_exit_weights(exit_weights, tuple(exit_layers))
    check_curriculum(curriculum)
    _check_total_steps(total_steps)
    return LegoPatch(model, adapter, layers, scales, curriculum, total_steps)


def exit_confidence(
    model: nn.Module,
    input_ids: Tensor,
    *,
    layer: int,
    measure: str = "max_prob",
    attention_mask: Tensor | None = None,
) -> Confidence:
    """Confidence of the shared final norm + head on the output of ``layer`` (1-based,
    ``num_layers`` = the model's own prediction), for ``input_ids [B, T]``.

    One forward that stops after ``layer``; ``lego_kernels.ops.exit_confidence`` on
    the pre-norm state, so no ``tokens x vocab`` tensor is kept. Returns
    ``Confidence(confidence f32, prediction i64, lse f32)``, each ``[B, T]``.
    ``measure``: ``"max_prob"`` | ``"margin"`` | ``"entropy"``. No gradient.
    """
    adapter = find_adapter(model)
    num_layers = len(adapter.layers(model))
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= num_layers:
        raise ValueError(
            f"layer must be an int in [1, {num_layers}] (1-based; {num_layers} is the "
            f"model's own head), got {layer!r}"
        )
    watched = adapter.final_norm(model) if layer == num_layers else adapter.layers(model)[layer]
    with torch.no_grad(), capture_inputs({"state": watched}, stop=True) as states:
        adapter.decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return head_confidence(states["state"], adapter.head(model), measure)


def head_confidence(hidden: Tensor, head: Head, measure: str) -> Confidence:
    """``ops.exit_confidence`` of pre-norm states ``hidden [..., D]`` through ``head``."""
    head = cast_head(head, hidden.dtype)
    return ops.exit_confidence(
        hidden,
        head.weight,
        head.norm_weight,
        head.norm_bias,
        norm=head.norm,
        eps=head.eps,
        measure=measure,
    )
