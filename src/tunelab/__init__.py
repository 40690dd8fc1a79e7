"""tunelab: fine-tune a pretrained LLM on your own data, and measure whether it was worth it."""

__version__ = "0.1.0"
