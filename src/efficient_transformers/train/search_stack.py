"""The unit whose cost `eft search` measures: the Transformer stack of the model a trial would train.

`build_stack` is a layer factory in the sense of `bench.harness.Workload.factory`: the benchmark's
isolated memory probe and its timing harness build it with `build_stack(dim=, heads=, causal=,
model_spec=...)` and run a training step on x of shape (B, N, dim), exactly as `eft bench --mode
train` does for one attention layer. The model is built from its spec (`objective.model_config`, the
keyword arguments that rebuild the model a trial trains) and its stack is returned: every block
(attention + feed-forward, norms, residuals) as the model builds it, embeddings and the output head
left out (they cost O(N dim) and are the same for every mechanism).

The probe imports this file by its path in a process of its own, so it uses absolute imports only.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def build_stack(*, dim: int, heads: int, causal: bool, model_spec: dict[str, Any]) -> nn.Module:
    """The model's Transformer stack (B, N, dim) -> (B, N, dim); dim, heads and causal come from the spec."""
    from efficient_transformers.train.objective import build_model

    spec = dict(model_spec)
    if (spec.get("dim"), spec.get("heads")) != (dim, heads):
        raise ValueError(f"build_stack: the workload's dim={dim}, heads={heads} disagree with the model spec's "
                         f"dim={spec.get('dim')}, heads={spec.get('heads')}")
    if causal != (spec.get("class") == "TransformerLM"):
        raise ValueError(f"build_stack: causal={causal} but the spec builds a {spec.get('class')}")
    model = build_model(spec)
    return model.stack if hasattr(model, "stack") else model.encoder.stack
