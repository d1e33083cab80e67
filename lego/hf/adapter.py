"""What ``lego.hf`` needs to know about one family of Hugging Face causal LMs.

A family module (``modeling_<family>.py``, as in ``transformers``) subclasses
:class:`Adapter` once for the model classes that share a decoder layout. The patch,
the exits and the confidence (``lego.hf.patch``) use only the first group of
methods: where the decoder, its layers, the final norm and the head are. Decoding
(``lego.hf.generation``) also runs the decoder piece by piece on the model's own
KV cache (a ``transformers.DynamicCache``): embed, build a layer range's inputs
(masks, position embeddings), run one layer, and compute one layer's keys/values
from a state without running the layer (the "propagate" early exit).

Layers are 0-based ``index`` here (``layers[index]``); the public API numbers
exits 1-based (exit ``l`` reads the output of ``layers[l - 1]``, which is the input
of ``layers[l]``). Shapes: ``B`` rows, ``T`` new positions, ``D`` hidden size,
``Hkv`` key/value heads, ``Dh`` head size.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn


class Head(NamedTuple):
    """The model's shared final norm and output head, as the fused ops take them.

    ``norm`` is ``"rms"`` or ``"layer"``; ``norm_weight`` and ``norm_bias`` are ``[D]``
    (``norm_bias`` ``None`` for RMSNorm); ``weight`` is the head's ``[V, D]``
    (the input embedding itself when the model ties them).
    """

    norm: str
    norm_weight: Tensor
    norm_bias: Tensor | None
    eps: float
    weight: Tensor


class Adapter:
    """One decoder layout shared by ``model_classes`` (subclass it in a family module)."""

    #: the ``transformers`` class names this layout covers (``transformers.<name>``)
    model_classes: tuple[str, ...] = ()

    # --------------------------------------------------------------- structure (patch)

    def decoder(self, model: nn.Module) -> nn.Module:
        """The base model that the causal LM's ``forward`` calls (``model.model``, ...)."""
        raise NotImplementedError

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in order."""
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm the decoder applies after its last layer (its input is pre-norm)."""
        raise NotImplementedError

    def head(self, model: nn.Module) -> Head:
        """The final norm's kind, weights and eps, and the output head's weight."""
        raise NotImplementedError

    # --------------------------------------------------------------- pieces (decoding)

    def embed(self, model: nn.Module, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        """Input states ``[B, T, D]`` of ``input_ids [B, T]`` at ``position_ids [B, T]``."""
        raise NotImplementedError

    def layer_inputs(
        self,
        model: nn.Module,
        hidden: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        cache: object,
        first: int,
        last: int,
    ) -> object:
        """What ``run_layer`` and ``layer_kv`` need for ``layers[first:last]`` on ``hidden``.

        ``attention_mask`` is the 2-D padding mask ``[B, S]`` over every position of
        the rows (cached and new, ``S = past + T``); the masks are sized against the
        cache length of ``layers[first]`` (the layers of one range share it).
        """
        raise NotImplementedError

    def run_layer(
        self, model: nn.Module, index: int, hidden: Tensor, inputs: object, cache: object
    ) -> Tensor:
        """``layers[index]`` on ``hidden [B, T, D]``, appending its keys/values to ``cache``."""
        raise NotImplementedError

    def layer_kv(
        self, model: nn.Module, index: int, hidden: Tensor, position_ids: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Keys and values ``[B, Hkv, T, Dh]`` that ``layers[index]`` would cache for
        inputs ``hidden [B, T, D]`` at ``position_ids [B, T]``, nothing else run."""
        raise NotImplementedError
