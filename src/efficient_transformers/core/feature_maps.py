"""Feature maps phi for kernel attention (Performer, Linear Transformer).

Kernel attention replaces exp(q . k) by phi(q) . phi(k) with phi: R^d -> R^m_{>=0}, so that

    out_i = sum_j phi(q_i) . phi(k_j) v_j / sum_j phi(q_i) . phi(k_j)

can be re-associated as phi(Q) (phi(K)^T V) and never forms an N x N matrix (see `kernel_attention`).

Every map's `forward(x)` is its definition, phi(x) (..., N, m), used by the slow references.
Exponential maps (`exponential = True`: FAVOR+'s positive and hyperbolic features) also expose
their logarithm in two parts, `projection(x)` (varies across features) and `log_norm(x)` (one
value per row), so that kernel attention can evaluate them stably: it subtracts stabilisers that
cancel in the ratio above (see `kernel_attention`), and a query's log-norm, a per-row constant, is
never computed at all.

Feature maps are defined up to a positive constant factor (Performer's 1/sqrt(m)): it cancels in
the normalised attention, so it is left out. As in the Performer reference implementation, the
random-feature maps add a small stabiliser `epsilon` to every feature (relative to the row's
largest feature for FAVOR+, absolute for ReLU); it keeps each normaliser at least epsilon times the
query's largest feature, so neither the output nor its gradient can divide by an underflowed sum.

Random features are buffers (saved with the weights). `gaussian_random_matrix` draws them from an
explicit `torch.Generator` given by `core.randomness.SeededDraws`, so a layer built after
`torch.manual_seed(s)` is reproducible and a redraw (Performer's option) is an explicit, seeded event.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .randomness import SeededDraws


def gaussian_random_matrix(
    num_rows: int, dim: int, *, orthogonal: bool, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(num_rows, dim) random projection directions with N(0, I_d) marginals.

    With `orthogonal`, rows come in blocks of `dim` exactly orthogonal directions (QR of a Gaussian
    matrix, Performer's orthogonal random features) whose lengths are redrawn as the norms of
    independent Gaussian vectors (chi_d distributed), so each row is still marginally N(0, I_d) and
    the softmax-kernel estimate stays unbiased while its variance drops.
    """
    if not orthogonal:
        return torch.randn(num_rows, dim, generator=generator, dtype=torch.float64).to(dtype)
    blocks = []
    for _ in range(-(-num_rows // dim)):
        gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)  # (d, d)
        q, r = torch.linalg.qr(gaussian)  # q: (d, d) orthogonal
        q = q * torch.sign(torch.diagonal(r))[None, :]  # unique QR: Haar-distributed q
        blocks.append(q.T)  # rows are orthonormal directions
    directions = torch.cat(blocks, dim=0)[:num_rows]  # (m, d)
    lengths = torch.randn(num_rows, dim, generator=generator, dtype=torch.float64).norm(dim=1)  # (m,) ~ chi_d
    return (directions * lengths[:, None]).to(dtype)


def _matmul_into(a: Tensor, b: Tensor, out: Tensor | None, accumulate: bool = False) -> Tensor:
    """a (..., n, k) @ b (k, p) -> `out` (..., n, p) (a new tensor when None; added to it with
    `accumulate`). Operands whose leading dimensions do not fold into rows go one matrix at a time
    (`mm` reads and writes any row stride in place; `matmul` would copy or broadcast b)."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):  # out= has no autograd
        product = a @ b  # (..., n, p)
        return product if out is None else (out.add_(product) if accumulate else out.copy_(product))
    if out is None:
        out = a.new_empty(a.shape[:-1] + (b.shape[-1],))
    if a.dim() == 2 or (a.is_contiguous() and out.is_contiguous()):
        rows, rows_out = a.reshape(-1, a.shape[-1]), out.view(-1, out.shape[-1])
        if accumulate:
            torch.addmm(rows_out, rows, b, out=rows_out)  # not addmm_: product counters know `addmm`
        else:
            torch.mm(rows, b, out=rows_out)
        return out
    for index in itertools.product(*(range(size) for size in a.shape[:-2])):
        if accumulate:
            torch.addmm(out[index], a[index], b, out=out[index])
        else:
            torch.mm(a[index], b, out=out[index])
    return out


class FeatureMap(nn.Module):
    """phi: (..., N, d) -> (..., N, m), non-negative. Exponential maps also give log phi in parts."""

    exponential: bool = False
    epsilon: float = 0.0
    #: evaluate phi once on the whole sequence (under autograd) instead of per segment with
    #: recomputation: for maps whose features are no larger than their inputs
    precompute: bool = False
    #: phi(x) = x (features given): kernel attention passes gradients straight through
    identity: bool = False

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    @property
    def num_features(self) -> int:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class EluPlusOne(FeatureMap):
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020): positive, m = d, no randomness.

    `precompute = True`: phi is no larger than its input, so kernel attention evaluates it once on the
    whole sequence and keeps it for the backward pass instead of recomputing it per segment. Its
    derivative is a function of phi alone, min(phi, 1) (1 where x > 0, exp(x) = phi elsewhere), so
    the backward pass keeps phi and not x.
    """

    precompute = True

    @property
    def num_features(self) -> int:
        return self.head_dim

    def forward(self, x: Tensor) -> Tensor:
        return _EluPlusOneFunction.apply(x)  # (..., N, d)


class _EluPlusOneFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        phi = F.elu(x).add_(1.0)
        ctx.save_for_backward(phi)
        return phi

    @staticmethod
    def backward(ctx, grad_phi):
        (phi,) = ctx.saved_tensors
        return torch.mul(grad_phi, phi.clamp(max=1.0))  # stored like grad_phi (kernel attention: heads-last)


class Identity(FeatureMap):
    """phi(x) = x, for features computed beforehand (see `FeatureMap.precompute`)."""

    identity = True

    @property
    def num_features(self) -> int:
        return self.head_dim

    def forward(self, x: Tensor) -> Tensor:
        return x


class RandomFeatures(FeatureMap):
    """Random projections omega (m, d), a buffer, drawn from the layer's seeded randomness.

    Draw r comes from `core.randomness.SeededDraws`: its seed and draw count are buffers
    (`random.seed`, `random.draws`), so a saved layer reloads with its features; `redraw()` takes the
    next draw.
    """

    def __init__(self, head_dim: int, nb_features: int, *, orthogonal: bool) -> None:
        super().__init__(head_dim)
        self.nb_features, self.orthogonal = nb_features, orthogonal
        self.random = SeededDraws()
        self.register_buffer("omega", self._draw())  # (m, d)

    def _draw(self) -> Tensor:
        return gaussian_random_matrix(self.nb_features, self.head_dim, orthogonal=self.orthogonal,
                                      generator=self.random.generator())

    @torch.no_grad()
    def redraw(self) -> None:
        """Replace omega by the next seeded draw (in place, keeping its dtype and device)."""
        self.random.redraw()
        self.omega.copy_(self._draw())

    def scaled_omega(self, dtype: torch.dtype) -> Tensor:
        """omega d^(-1/4) (m, d) in `dtype`, cached until omega changes (redraw, load, move)."""
        key = (self.omega.data_ptr(), self.omega._version, self.omega.device, dtype)
        if getattr(self, "_scaled_key", None) != key:
            self._scaled_cache, self._scaled_key = self.omega.to(dtype) * self.head_dim**-0.25, key
        return self._scaled_cache

    def project(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """x' omega^T with x' = x d^(-1/4), so that exp(q' . k') = exp(q . k / sqrt(d)). (..., N, m)

        Written into `out` when given (any strides). An input whose leading dimensions do not fold
        into its rows (a segment of a sequence, a head of a fused projection) is projected one
        matrix at a time, reading it in place: a batched product would copy it, or broadcast omega."""
        weight = self.scaled_omega(x.dtype).T  # (d, m)
        return _matmul_into(x, weight, out)


class PositiveRandomFeatures(RandomFeatures):
    """FAVOR+ (Choromanski et al. 2020): E[phi(q) . phi(k)] = exp(q . k / sqrt(d)), phi >= 0.

    positive:    phi(x) = exp(-|x'|^2 / 2) [exp(omega x') + eps max_f exp(omega_f x')]        (m features)
    hyperbolic:  the same with [omega x', -omega x'] in place of omega x'                    (2m features,
                 the paper's phi++, lower variance for the same draws)

    log phi = log(exp(projection(x)) + eps max exp(projection(x))) + log_norm(x), with
    projection(x) = omega x' and log_norm(x) = -|x'|^2 / 2; eps = 1e-6 (the reference
    implementation's numerical stabiliser).
    """

    exponential = True
    epsilon = 1e-6

    def __init__(self, head_dim: int, nb_features: int, *, orthogonal: bool, hyperbolic: bool = False) -> None:
        super().__init__(head_dim, nb_features, orthogonal=orthogonal)
        self.hyperbolic = hyperbolic

    @property
    def num_features(self) -> int:
        return 2 * self.nb_features if self.hyperbolic else self.nb_features

    @property
    def native_favor(self) -> bool:
        """Kernel attention may run this map in the native kernels (`efficient_transformers.native`), which
        implement exactly this class's positive map: not the hyperbolic one, nor a subclass that redefines
        the projection, the log-norm or the epsilon (those run the portable path, which calls them)."""
        cls = type(self)
        return (not self.hyperbolic and cls.projection is PositiveRandomFeatures.projection
                and cls.log_norm is PositiveRandomFeatures.log_norm and cls.epsilon == PositiveRandomFeatures.epsilon)

    def projection(self, x: Tensor) -> Tensor:
        """The part of log phi(x) that varies across features: omega x' (and -omega x'). (..., N, m)"""
        if not self.hyperbolic:
            return self.project(x)  # (..., N, m)
        if torch.is_grad_enabled() and x.requires_grad:  # out= has no autograd
            projected = self.project(x)  # (..., N, m)
            return torch.cat([projected, -projected], dim=-1)
        projected = x.new_empty(x.shape[:-1] + (2 * self.nb_features,))  # (..., N, 2 m)
        self.project(x, out=projected[..., : self.nb_features])
        torch.neg(projected[..., : self.nb_features], out=projected[..., self.nb_features :])
        return projected

    def log_norm(self, x: Tensor) -> Tensor:
        """The per-row part of log phi(x): -|x'|^2 / 2. (..., N)"""
        return x.square().sum(-1) * (-0.5 / math.sqrt(self.head_dim))

    def projection_backward(self, grad_projection: Tensor) -> Tensor:
        """d loss / d x through `projection` (linear in x), from d loss / d projection (..., N, m) -> (..., N, d).
        Kernel attention calls it instead of local autograd (no graph over the features)."""
        if self.hyperbolic:
            half = self.nb_features
            grad_projection = grad_projection[..., :half] - grad_projection[..., half:]  # (..., N, m / 2)
        return grad_projection @ self.scaled_omega(grad_projection.dtype)  # (..., N, d)

    def log_norm_backward(self, x: Tensor, grad_norm: Tensor) -> Tensor:
        """d loss / d x through `log_norm`, from d loss / d log_norm (..., N) -> (..., N, d)."""
        return x * (grad_norm * (-1.0 / math.sqrt(self.head_dim)))[..., None]

    def backward_into(self, out: Tensor, grad_projection: Tensor, x: Tensor | None = None,
                      grad_norm: Tensor | None = None) -> Tensor:
        """`projection_backward` (+ `log_norm_backward` when x and grad_norm are given), written into
        `out` (..., N, d) whatever its strides (kernel attention: the heads-last gradient buffers)."""
        if self.hyperbolic:
            half = self.nb_features
            grad_projection = grad_projection[..., :half] - grad_projection[..., half:]  # (..., N, m / 2)
        weight = self.scaled_omega(grad_projection.dtype)  # (m, d)
        if x is None:
            return _matmul_into(grad_projection, weight, out)
        torch.mul(x, (grad_norm * (-1.0 / math.sqrt(self.head_dim)))[..., None], out=out)
        return _matmul_into(grad_projection, weight, out, accumulate=True)

    def forward(self, x: Tensor) -> Tensor:
        """phi(x) computed directly (it may overflow in float32: for references; attention uses the parts)."""
        projected = self.projection(x)  # (..., N, m)
        peak = projected.amax(dim=-1, keepdim=True).exp()  # (..., N, 1)
        return (projected.exp() + self.epsilon * peak) * self.log_norm(x).exp()[..., None]  # (..., N, m)


class ReluRandomFeatures(RandomFeatures):
    """Performer's generalized attention with f = ReLU: phi(x) = relu(omega x') + eps, a different
    kernel than softmax (not an estimate of it); eps = 1e-3 as in the reference implementation, so
    no row of features is all zero."""

    epsilon = 1e-3

    @property
    def num_features(self) -> int:
        return self.nb_features

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.project(x)) + self.epsilon  # (..., N, m)
