"""efficient-transformers: every model of "Efficient Transformers: A Survey" (Tay et al., arXiv 2009.06732)
in one tested PyTorch package, measured on memory and compute.

    import efficient_transformers as et
    et.mechanisms()                       # the registered mechanisms' cards, in the survey's order
    attn = et.build_attention("vanilla", dim=256, heads=4, causal=True)
    lm = et.TransformerLM(vocab_size=256, attention="vanilla")
    q = et.quantize(lm)                   # an int8 copy for CPU inference
"""

from .models import TransformerClassifier, TransformerEncoder, TransformerLM
from .models import RetrievalModel, SetTransformer
from .models.quantize import quantize
from .registry import Card, build_attention, card, mechanisms

__version__ = "0.1.0"

__all__ = ["Card", "RetrievalModel", "SetTransformer", "TransformerClassifier", "TransformerEncoder", "TransformerLM", "build_attention", "card", "mechanisms", "quantize"]
