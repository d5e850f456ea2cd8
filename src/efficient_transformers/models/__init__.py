"""Models built on the registry: the shared stack, the language model and the classifier."""

from .blocks import FeedForward, TransformerBlock, TransformerStack
from .classifier import TransformerClassifier, TransformerEncoder
from .lm import TransformerLM
from .retrieval import RetrievalModel

__all__ = ["FeedForward", "RetrievalModel", "TransformerBlock", "TransformerClassifier", "TransformerEncoder", "TransformerLM", "TransformerStack"]
