"""tsugiki (接ぎ木, "grafting"): parameter-efficient fine-tuning of large language models."""

__version__ = "0.1.0"
