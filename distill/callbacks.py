"""The former home of `AttentionLogger` (now `distill.inspect.callbacks`): recipes with
`class_path: distill.callbacks.AttentionLogger` keep working."""
from .inspect.callbacks import AttentionLogger

__all__ = ["AttentionLogger"]
