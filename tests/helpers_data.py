"""Small in-process tokenizers and a tiny Llama for the data tests (nothing is downloaded)."""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "What is the capital of France? The capital of France is Paris.",
    "Translate to French: good morning. Bonjour.",
    "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。### 指示: ### 回答: 日本の首都は東京です。",
    "[INST] <<SYS>> You are a helpful assistant. <</SYS>> [/INST]",
    "user assistant system hello hi there how are you fine thanks",
]

# ChatML, as SmolLM2 and Qwen write it (no default system turn, to keep spans simple).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@functools.lru_cache(maxsize=None)
def _trained(specials: tuple[str, ...]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def make_tokenizer(bos: bool = True, pad: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ``</s>`` as EOS; adds ``<s>`` in front when ``bos``; ``<pad>`` when ``pad``."""
    tok = Tokenizer.from_str(_trained(("<pad>", "<s>", "</s>")).to_str())
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>" if pad else None
    )


def make_chat_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with a ChatML chat template, EOS ``<|im_end|>`` and no pad token."""
    tok = Tokenizer.from_str(_trained(("<|endoftext|>", "<|im_start|>", "<|im_end|>")).to_str())
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    out.chat_template = CHATML
    return out


def tiny_llama(attn_implementation: str = "sdpa", vocab_size: int = 400, **overrides):
    """A 2-layer Llama with random fp32 weights, in eval mode (``overrides``: more LlamaConfig fields)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **overrides,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation, torch_dtype=torch.float32).eval()


def save_model_folder(folder) -> str:
    """:func:`tiny_llama` and :func:`make_chat_tokenizer` saved in ``folder``: a model folder the CLI loads."""
    tiny_llama().save_pretrained(folder)
    make_chat_tokenizer().save_pretrained(folder)  # has a chat template, so 'alpaca' is never the default
    return str(folder)


def write_jsonl(path, rows) -> str:
    """``rows`` as a JSON-lines file at ``path``; returns the path as a string."""
    import json

    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)
