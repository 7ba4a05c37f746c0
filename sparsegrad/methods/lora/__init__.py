"""LoRA (peft"s adapters) on the target linears.
"""

from sparsegrad.methods.lora.method import Lora

__all__ = ["Lora"]
