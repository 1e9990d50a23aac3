"""Data layer: split readers, transforms, tokenizers, the synthetic benchmark, datamodules."""
