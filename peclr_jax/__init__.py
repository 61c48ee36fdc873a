"""peclr_jax: PeCLR equivariant contrastive pre-training for 3D hand pose in JAX."""

__version__ = "0.1.0"
