"""Models built on the registry: the shared stack, the language model and the classifier."""

from .blocks import FeedForward, TransformerBlock, TransformerStack
from .classifier import TransformerClassifier, TransformerEncoder
from .lm import TransformerLM

__all__ = ["FeedForward", "TransformerBlock", "TransformerClassifier", "TransformerEncoder", "TransformerLM", "TransformerStack"]
