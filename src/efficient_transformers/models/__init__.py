"""Models built on the registry: the shared stack, the language model and the classifier, and the
model-level techniques (weight sharing, reversible layers and chunked feed-forward in `blocks` and
`reversible`; adapters and LoRA in `adapters`; int8 quantization in `quantize`)."""

from .blocks import FeedForward, TransformerBlock, TransformerStack
from .classifier import TransformerClassifier, TransformerEncoder
from .lm import TransformerLM
from .retrieval import RetrievalModel
from .set_transformer import ISAB, MAB, PMA, SAB, SetTransformer

__all__ = ["FeedForward", "ISAB", "MAB", "PMA", "RetrievalModel", "SAB", "SetTransformer", "TransformerBlock", "TransformerClassifier", "TransformerEncoder", "TransformerLM", "TransformerStack"]
