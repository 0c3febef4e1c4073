"""lorafit: fine-tune causal language models with LoRA and QLoRA on Lightning and Hydra."""

__version__ = "0.1.0"
