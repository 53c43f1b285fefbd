"""Sharing a model: the Hub/timm folder `distill export --format hf` writes, its model card, `distill push`."""
