"""survjax: multimodal survival prediction robust to missing modalities, in JAX/Flax."""

__version__ = "0.1.0"
