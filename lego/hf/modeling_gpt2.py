"""The GPT-2 layout for ``lego.hf``.

``GPT2LMHeadModel`` holds ``transformer`` (``wte`` token and ``wpe`` learned position
embeddings, dropout, blocks ``h``, final ``ln_f``) and ``lm_head``, tied to ``wte``
by default. A block is ``ln_1`` -> attention (one fused ``c_attn`` Conv1D giving
queries, keys and values) -> ``ln_2`` -> MLP, with residuals; ``ln_f`` is a LayerNorm
with a bias (``config.layer_norm_epsilon``), so the fused ops get ``norm="layer"``.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask

from lego.hf.adapter import Adapter, Head


class GPT2Inputs(NamedTuple):
    """Inputs shared by a range of blocks: the attention mask and the positions."""

    mask: Tensor | None
    position_ids: Tensor


class GPT2Layout(Adapter):
    model_classes = ("GPT2LMHeadModel",)

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.transformer

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.transformer.h

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.transformer.ln_f

    def head(self, model: nn.Module) -> Head:
        norm = model.transformer.ln_f
        return Head("layer", norm.weight, norm.bias, float(norm.eps), model.lm_head.weight)

    def embed(self, model: nn.Module, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        transformer = model.transformer
        return transformer.drop(transformer.wte(input_ids) + transformer.wpe(position_ids))

    def layer_inputs(
        self,
        model: nn.Module,
        hidden: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        cache: object,
        first: int,
        last: int,
    ) -> GPT2Inputs:
        mask = create_causal_mask(
            config=model.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            layer_idx=first,
        )
        return GPT2Inputs(mask, position_ids)

    def run_layer(
        self, model: nn.Module, index: int, hidden: Tensor, inputs: GPT2Inputs, cache: object
    ) -> Tensor:
        block = model.transformer.h[index]
        return block(
            hidden, cache, inputs.mask, None, use_cache=True, position_ids=inputs.position_ids
        )

    def layer_kv(
        self, model: nn.Module, index: int, hidden: Tensor, position_ids: Tensor
    ) -> tuple[Tensor, Tensor]:
        attn = model.transformer.h[index].attn
        x = model.transformer.h[index].ln_1(hidden)
        _, keys, values = attn.c_attn(x).split(attn.split_size, dim=2)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        return keys.view(shape).transpose(1, 2), values.view(shape).transpose(1, 2)
