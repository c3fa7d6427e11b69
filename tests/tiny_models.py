"""Tiny models built in-process (no downloads), shared by the tests."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 64


def llama_config(**overrides) -> LlamaConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(**overrides)).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_bert_question_answering(seed: int = 0):
    from transformers import BertForQuestionAnswering

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    return BertForQuestionAnswering(cfg).eval()


def tiny_falcon(seed: int = 0, hidden: int = 32):
    """Falcon's linear layers are FalconLinear, a subclass of nn.Linear."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(seed)
    return FalconForCausalLM(FalconConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2,
                                          num_attention_heads=4)).eval()


def tiny_roberta_classifier(seed: int = 0, num_labels: int = 3):
    """RoBERTa's head is a module with sub-modules (classifier.dense, classifier.out_proj)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=70, num_labels=num_labels)
    return RobertaForSequenceClassification(cfg).eval()


class TinyMLP(nn.Module):
    """A plain torch model (no transformers) to show injection works on any nn.Module."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(20, 8)
        self.lin0 = nn.Linear(8, 16)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(16, 4)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(self.emb(x).mean(1))))


class TinyConvNet(nn.Module):
    """A small vision classifier: convolution features, then a linear head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.fc = nn.Linear(16, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.relu(self.fc(self.features(x).flatten(1))))


def token_batch(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def randomize_adapters(model: nn.Module, seed: int = 3, scale: float = 0.1) -> None:
    """Give every adapter parameter random values, so tests see a non-zero update."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def write_tiny_gguf(path, layers: int) -> None:
    """A GGUF file with a tiny Llama's metadata (hidden 32, vocab 100) and only its embedding as a tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_context_length(128)
    writer.add_vocab_size(100)
    writer.add_tensor("token_embd.weight", np.zeros((100, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
