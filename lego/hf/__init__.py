"""Hugging Face causal LMs with the fused loss, LEGO exits and early-exit generation.

``apply_lego`` patches a ``transformers`` model in place (Llama, Mistral, Qwen2 and
GPT-2 families; ``lego.hf.patch``), ``exit_confidence`` reads the shared head at any
layer, ``generate`` decodes with early exit or self-speculation on the model's own KV
cache (``lego.hf.generation``). One module per model family (``modeling_llama``,
``modeling_gpt2``) says where each piece of the model is (``lego.hf.adapter``).
Needs the optional extra: ``pip install "lego-kernels[hf]"``.
"""

try:
    import transformers  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError('lego.hf needs transformers: pip install "lego-kernels[hf]"') from error

from lego.hf.generation import generate
from lego.hf.patch import (
    SUPPORTED,
    LegoCausalLMOutput,
    LegoCurriculumCallback,
    LegoPatch,
    apply_lego,
    exit_confidence,
)

__all__ = [
    "SUPPORTED",
    "LegoCausalLMOutput",
    "LegoCurriculumCallback",
    "LegoPatch",
    "apply_lego",
    "exit_confidence",
    "generate",
]
