"""dsc: a compiler for DeepSeek-style Mixture-of-Experts LLMs."""

__version__ = "0.1.0"
