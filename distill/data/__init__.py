"""The data side: ImageDataModule, its datasets (image folders, Hugging Face datasets, unlabelled images), DeiT's
transforms, samplers, keyed views, on-device batches."""
