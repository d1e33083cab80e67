"""Tiny random-initialized Hugging Face causal LMs of each family ``lego.hf`` supports.

Built from configs (no download), dropout off, and the norms' weights and biases
moved away from 1 and 0, so that a norm applied twice, or of the wrong kind, shows.
Shared by ``tests/test_hf_*.py``, which import ``one_thread_torch_backend`` (autouse).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from lego_kernels import ops

FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
}


def tiny_config(
    family: str, *, layers: int = 4, vocab: int = 300, hidden: int = 32, heads: int = 4
) -> transformers.PretrainedConfig:
    """A small config of ``family``; the head is untied except for GPT-2 (tied by default)."""
    config_name, _ = CLASSES[family]
    config_class = getattr(transformers, config_name)
    if family == "gpt2":
        return config_class(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=256,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    return config_class(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
    )


def tiny_model(family: str, *, tied: bool | None = None, seed: int = 0, **config_kwargs: int):
    """A random ``family`` model in train mode (``tied`` overrides the config's default)."""
    config = tiny_config(family, **config_kwargs)
    if tied is not None:
        config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[family][1])(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                if name.endswith("bias"):
                    param.normal_(0.0, 0.3)
                else:
                    param.normal_(1.0, 0.3)
    return model


def batch(vocab: int = 300, rows: int = 3, length: int = 12, seed: int = 1):
    """``(input_ids, attention_mask, labels)``: rows left-padded to different lengths,
    labels ``-100`` on padding and on a few real tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=gen)
    mask = torch.ones(rows, length, dtype=torch.long)
    for row in range(1, rows):
        mask[row, : 2 * row] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 3] = -100
    labels[-1, -2] = -100
    return ids, mask, labels


@pytest.fixture(autouse=True)
def one_thread_torch_backend():
    """The ops' torch backend and one thread (tiny shapes: a second thread only adds
    waiting, a lot of it on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with ops.use_backend("torch"):
        yield
    torch.set_num_threads(threads)
