"""Full fine-tuning: the targets stay ``nn.Linear`` and train densely.
"""

from sparsegrad.methods.full.method import Full

__all__ = ["Full"]
