"""Step 2: the ViT student with a distillation token, trained against the frozen teacher; feature guidance."""
