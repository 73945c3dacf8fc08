"""fdnc_jax: fast Deep Neuron Correspondence for C. elegans in JAX/Flax."""
