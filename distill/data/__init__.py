"""The data side: ImageDataModule, its datasets, DeiT's transforms, samplers, keyed views, on-device batches."""
