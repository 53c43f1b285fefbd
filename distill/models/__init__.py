"""The networks, on timm: builders, the metadata and heads they carry, checkpoint files, pretrained weights."""
