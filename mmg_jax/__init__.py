"""mmg-jax: multimodal generalization (MMG-Ego4D) in JAX/Flax."""
