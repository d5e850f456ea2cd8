"""Reversible residual layers (Gomez et al. 2017; Reformer, Kitaev et al. 2020, arXiv 2001.04451).

Each block maps a pair of streams (X1, X2) to

    Y1 = X1 + f(X2)          f = the attention sublayer  drop(Attn(LN1(.)))
    Y2 = X2 + g(Y1)          g = the feed-forward sublayer drop(FFN(LN2(.)))

and its inputs can be recomputed from its outputs: X2 = Y2 - g(Y1), X1 = Y1 - f(X2). So the whole
stack runs as one autograd Function that keeps only the last pair (Y1, Y2): in the backward pass it
walks the blocks from the top, recomputes each block's inputs and, with one block's graph at a
time, back-propagates through it. Activation memory is one block's plus two streams, whatever the
depth (measured by `python -m efficient_transformers.bench.techniques reversible`).

The recomputation must give the numbers of the forward pass, so for each block call we keep
- the RNG state before f and before g (dropout masks, like `torch.utils.checkpoint`);
- the autocast state (bf16 / fp16 training);
- a copy of the attention layer's buffers when its card says it updates buffers in training (e.g.
  Performer's feature redraw), loaded for the recomputation and put back after it;
- the layer's auxiliary losses (`core.aux_losses`): they are outputs of the Function, so their
  gradients reach the weights through the recomputed graph, and the layers' `aux_losses` dicts
  hold those differentiable outputs after the forward, as in an ordinary forward.

Gradients equal those of the same equations under plain autograd (tested in float64 for every
registered mechanism). Reconstruction X = Y - f(.) is exact in exact arithmetic; in floating point
it differs from the forward's X by rounding (about one unit in the last place of Y per block).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core.aux_losses import ReportsAuxLosses


def needs_recompute(blocks: nn.ModuleList, x: Tensor) -> bool:
    """True when this call builds a graph (autograd on, and x or a weight needs a gradient)."""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for p in blocks.parameters())


def reversible_blocks(blocks: list[nn.Module], x: Tensor, mask: Tensor | None,
                      global_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """x (B, N, dim) -> (Y1, Y2) after all blocks, with X1 = X2 = x, recomputing in backward."""
    params = list({id(p): p for b in blocks for p in b.parameters() if p.requires_grad}.values())
    run = _Run(blocks, mask, global_mask, params)
    outs = _ReversibleFunction.apply(x, run, *params)
    run.install_aux_losses(outs[2:])
    return outs[0], outs[1]


class _Call:
    """What one block call needs to be replayed: RNG states, autocast, buffer copies, its aux losses."""

    def __init__(self) -> None:
        self.rng_f: Any = None
        self.rng_g: Any = None
        self.buffers: dict[str, Tensor] | None = None
        self.aux: list[tuple[ReportsAuxLosses, str, float]] = []  # (layer, name, weight) per aux output


class _Run:
    def __init__(self, blocks, mask, global_mask, params) -> None:
        self.blocks, self.mask, self.global_mask, self.params = blocks, mask, global_mask, params
        self.index = {id(p): i for i, p in enumerate(params)}
        self.calls: list[_Call] = []
        self.aux_layers = [[m for m in b.modules() if isinstance(m, ReportsAuxLosses)] for b in blocks]
        self.keeps_buffers = [
            b.training and any(getattr(getattr(m, "card", None), "updates_buffers_in_training", False) for m in b.modules())
            for b in blocks
        ]

    # ------------------------------------------------------------------ the sublayers, with their aux losses
    def attention(self, i: int, x2: Tensor) -> tuple[Tensor, dict[ReportsAuxLosses, dict]]:
        """f(x2) of block i and the aux losses it reported, leaving the layers' dicts as they were."""
        layers = self.aux_layers[i]
        saved = [(layer.aux_losses, layer.accumulate_aux_losses) for layer in layers]
        for layer in layers:
            layer.aux_losses, layer.accumulate_aux_losses = {}, True
        try:
            f, _ = self.blocks[i].attention_branch(x2, self.mask, None, self.global_mask)
            reported = {layer: layer.aux_losses for layer in layers if layer.aux_losses}
        finally:
            for layer, (losses, accumulate) in zip(layers, saved):
                layer.aux_losses, layer.accumulate_aux_losses = losses, accumulate
        return f, reported

    def install_aux_losses(self, values: tuple[Tensor, ...]) -> None:
        """Put the Function's (differentiable) aux-loss outputs into the layers' dicts, call by call,
        with the accumulation rule of an ordinary forward."""
        it = iter(values)
        for call in self.calls:
            started: set[int] = set()
            for layer, name, weight in call.aux:
                if not layer.accumulate_aux_losses and id(layer) not in started:
                    layer.aux_losses = {}  # a bare layer keeps its latest call's losses
                started.add(id(layer))
                layer.report_aux_loss(name, next(it), weight)

    # ------------------------------------------------------------------ replay
    def snapshot_buffers(self, i: int) -> dict[str, Tensor] | None:
        if not self.keeps_buffers[i]:
            return None
        return {name: b.detach().clone() for name, b in self.blocks[i].named_buffers()}

    def load_buffers(self, i: int, values: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, b in self.blocks[i].named_buffers():
                b.copy_(values[name])


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _Replay:
    """Context: the RNG state, autocast state and buffers of a recorded call, restored afterwards."""

    def __init__(self, run: _Run, i: int, call: _Call, rng, device: torch.device, autocast) -> None:
        self.run, self.i, self.call, self.rng, self.device, self.autocast = run, i, call, rng, device, autocast

    def __enter__(self):
        devices = [self.device] if self.device.type == "cuda" else []
        self.fork = torch.random.fork_rng(devices=devices)
        self.fork.__enter__()
        torch.set_rng_state(self.rng[0])
        if self.rng[1] is not None:
            torch.cuda.set_rng_state(self.rng[1], self.device)
        self.current = None
        if self.call.buffers is not None:
            self.current = self.run.snapshot_buffers(self.i)
            self.run.load_buffers(self.i, self.call.buffers)
        device_type, enabled, dtype = self.autocast
        self.cast = torch.autocast(device_type, dtype=dtype, enabled=enabled)
        self.cast.__enter__()
        self.grad = torch.enable_grad()
        self.grad.__enter__()
        return self

    def __exit__(self, *exc):
        self.grad.__exit__(*exc)
        self.cast.__exit__(*exc)
        if self.current is not None:
            self.run.load_buffers(self.i, self.current)
        self.fork.__exit__(*exc)
        return False


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, run: _Run, *params: Tensor):
        device_type = x.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.run = run
        x1 = x2 = x  # (B, N, dim) each
        aux_values: list[Tensor] = []
        for i, block in enumerate(run.blocks):
            call = _Call()
            call.buffers = run.snapshot_buffers(i)
            call.rng_f = _rng_state(x.device)
            f, reported = run.attention(i, x2)
            for layer, losses in reported.items():
                for name, loss in losses.items():
                    call.aux.append((layer, name, loss.weight))
                    aux_values.append(loss.value.detach())
            x1 = x1 + f  # Y1 = X1 + f(X2)
            call.rng_g = _rng_state(x.device)
            x2 = x2 + block.ff_branch(x1)  # Y2 = X2 + g(Y1)
            run.calls.append(call)
        ctx.save_for_backward(x1, x2)
        ctx.n_aux = len(aux_values)
        return (x1, x2, *aux_values)

    @staticmethod
    def backward(ctx, dy1: Tensor | None, dy2: Tensor | None, *daux: Tensor | None):
        run: _Run = ctx.run
        y1, y2 = (t.detach() for t in ctx.saved_tensors)
        dy1 = torch.zeros_like(y1) if dy1 is None else dy1
        dy2 = torch.zeros_like(y2) if dy2 is None else dy2
        grads: list[Tensor | None] = [None] * len(run.params)
        aux_end = ctx.n_aux
        for i in reversed(range(len(run.blocks))):
            block, call = run.blocks[i], run.calls[i]
            block_params = list({id(p): p for p in block.parameters() if p.requires_grad}.values())
            # g: Y2 = X2 + g(Y1)  ->  X2 = Y2 - g(Y1);  dY1 += (dg/dY1)^T dY2
            with _Replay(run, i, call, call.rng_g, y1.device, ctx.autocast):
                y1_in = y1.detach().requires_grad_()
                g = block.ff_branch(y1_in)
                got = torch.autograd.grad(g, [y1_in, *block_params], dy2, allow_unused=True)
            x2 = y2 - g.detach()
            dy1 = dy1 + got[0]
            _accumulate(grads, run.index, block_params, got[1:])
            del g, got
            # f: Y1 = X1 + f(X2)  ->  X1 = Y1 - f(X2);  dX2 = dY2 + (df/dX2)^T dY1 (+ the aux losses' share)
            n_aux = len(call.aux)
            with _Replay(run, i, call, call.rng_f, y1.device, ctx.autocast):
                x2_in = x2.detach().requires_grad_()
                f, reported = run.attention(i, x2_in)
                outputs, grad_outputs = [f], [dy1]
                values = [loss.value for losses in reported.values() for loss in losses.values()]
                for value, grad in zip(values, daux[aux_end - n_aux:aux_end]):
                    if grad is not None:
                        outputs.append(value)
                        grad_outputs.append(grad)
                got = torch.autograd.grad(outputs, [x2_in, *block_params], grad_outputs, allow_unused=True)
            aux_end -= n_aux
            x1 = y1 - f.detach()
            dx2 = dy2 + got[0]
            _accumulate(grads, run.index, block_params, got[1:])
            del f, got, outputs
            y1, y2, dy2 = x1, x2, dx2
        return (dy1 + dy2, None, *grads)  # X1 = X2 = x: both streams' gradients


def _accumulate(grads: list, index: dict[int, int], params: list[Tensor], got) -> None:
    for p, g in zip(params, got):
        if g is None:
            continue
        j = index[id(p)]
        grads[j] = g if grads[j] is None else grads[j] + g
