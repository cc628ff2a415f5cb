"""gcvimoe: GC ViT vision transformers whose MLP blocks are sparse Mixture-of-Experts."""
__version__ = "0.1.0"
