"""ITQ: Gong & Lazebnik, "Iterative quantization: a Procrustean approach to learning binary
codes", CVPR 2011 (PCA-ITQ, unsupervised).

Centre the features, project on the top ``K`` principal directions ``W`` (``V = X W``), then
find the rotation ``R`` minimising the quantisation loss ``||B - V R||_F^2`` by alternating
``B = sign(V R)`` and the orthogonal Procrustes solution ``R = S_hat S^T`` from the SVD
``B^T V = S Omega S_hat^T``, ``n_iter = 50`` iterations from a random
orthogonal ``R`` as in the paper. The code is ``sign((x - mean) W R)``.

A shallow method: buffers only, fitted once on the frozen training features (the trainer
calls :meth:`fit`); ``encode`` returns ``tanh(p / std(p))``, same sign as the code.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fashionhash.methods.base import METHODS
from fashionhash.methods.lsh import ShallowHashing


@METHODS.register("itq")
class ITQ(ShallowHashing):
    """PCA to ``K`` dimensions + iterative quantisation rotation."""

    def __init__(self, feat_dim: int, n_bits: int, n_classes: int, *, hidden: int = 1024,
                 dropout: float = 0.1, backbone: nn.Module | None = None, n_iter: int = 50,
                 seed: int = 0) -> None:
        if n_bits > feat_dim:
            raise ValueError(f"ITQ needs n_bits <= feature width ({n_bits} > {feat_dim})")
        super().__init__(feat_dim, n_bits, n_classes, hidden=hidden, dropout=dropout, backbone=backbone)
        self.n_iter, self.seed = n_iter, seed
        self.quantization_error: float | None = None  # ||B - V R||_F^2 / N after fitting

    @torch.no_grad()
    def fit(self, feats: torch.Tensor, y: torch.Tensor | None = None) -> "ITQ":
        """PCA, then ``n_iter`` alternations of ``B`` and ``R``; labels are not used."""
        x = feats.double()
        mean = x.mean(dim=0)
        xc = x - mean
        cov = xc.T @ xc / max(1, len(xc) - 1)
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        k = self.n_bits
        w = vecs[:, -k:].flip(1)  # (F, K) top-K principal directions, largest first
        v = xc @ w
        g = torch.Generator().manual_seed(self.seed)
        r, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
        for _ in range(self.n_iter):
            b = torch.where(v @ r >= 0, 1.0, -1.0).double()
            s, _, sh_t = torch.linalg.svd(b.T @ v)  # B^T V = S Omega S_hat^T
            r = sh_t.T @ s.T
        self.quantization_error = float((torch.where(v @ r >= 0, 1.0, -1.0) - v @ r).pow(2).sum() / len(v))
        self.mean.copy_(mean.float())
        self.proj.copy_((w @ r).float())
        self._set_scale(feats.float())
        return self
