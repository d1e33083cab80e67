"""The Llama decoder layout for ``lego.hf``: Llama, Mistral and Qwen2.

``<X>ForCausalLM`` holds ``model`` (embed_tokens, layers, norm, rotary_emb) and
``lm_head``: pre-norm decoder layers (``input_layernorm`` -> attention with rotary
position embeddings and grouped keys/values -> ``post_attention_layernorm`` -> MLP),
a final RMSNorm (``weight * x * rsqrt(mean(x^2) + variance_epsilon)``) and a bias-free
head, tied to ``embed_tokens`` or not. The families differ only in which layers use
sliding-window attention: Qwen2 says it per layer (``config.layer_types``), Mistral
for all of them (``config.sliding_window``), Llama never.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lego.hf.adapter import Adapter, Head


class LlamaInputs(NamedTuple):
    """Inputs shared by a range of layers: a mask per attention type, cos/sin, positions."""

    masks: dict[str, Tensor | None]
    position_embeddings: tuple[Tensor, Tensor]
    position_ids: Tensor


def attention_type(config: object, index: int) -> str:
    """``"full_attention"`` or ``"sliding_attention"`` for ``layers[index]``."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return layer_types[index]
    if getattr(config, "sliding_window", None) is not None:
        return "sliding_attention"
    return "full_attention"


class LlamaLayout(Adapter):
    model_classes = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def head(self, model: nn.Module) -> Head:
        norm = model.model.norm
        return Head("rms", norm.weight, None, float(norm.variance_epsilon), model.lm_head.weight)

    def embed(self, model: nn.Module, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        return model.model.embed_tokens(input_ids)

    def layer_inputs(
        self,
        model: nn.Module,
        hidden: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        cache: object,
        first: int,
        last: int,
    ) -> LlamaInputs:
        config = model.config
        masks: dict[str, Tensor | None] = {}
        for index in range(first, last):
            kind = attention_type(config, index)
            if kind in masks:
                continue
            make = (
                create_sliding_window_causal_mask
                if kind == "sliding_attention"
                else create_causal_mask
            )
            masks[kind] = make(
                config=config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
                layer_idx=index,
            )
        cos_sin = model.model.rotary_emb(hidden, position_ids=position_ids)
        return LlamaInputs(masks, cos_sin, position_ids)

    def run_layer(
        self, model: nn.Module, index: int, hidden: Tensor, inputs: LlamaInputs, cache: object
    ) -> Tensor:
        return model.model.layers[index](
            hidden,
            attention_mask=inputs.masks[attention_type(model.config, index)],
            position_embeddings=inputs.position_embeddings,
            position_ids=inputs.position_ids,
            cache=cache,
            use_cache=True,
        )

    def layer_kv(
        self, model: nn.Module, index: int, hidden: Tensor, position_ids: Tensor
    ) -> tuple[Tensor, Tensor]:
        layer = model.model.layers[index]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        keys = attn.k_proj(x).view(shape).transpose(1, 2)
        values = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = model.model.rotary_emb(hidden, position_ids=position_ids)
        _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
        return keys, values
