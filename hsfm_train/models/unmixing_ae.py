"""The CNNAEU unmixing autoencoder (Palsson, Sveinsson & Ulfarsson, IEEE TGRS 2021) and a projection head for its
contrastive variant.

    encoder: conv 3x3 (B -> F) - LeakyReLU - BatchNorm - spatial dropout - conv 1x1 (F -> R) - BatchNorm -
             spatial dropout - softmax(scale * x) over R          -> abundances [N, R, H, W] (>= 0, sum to one)
    decoder: one linear conv k x k (R -> B), no bias, weights >= 0 -> reconstruction [N, B, H, W]

The endmembers are the decoder's weights averaged over its k x k kernel. Non-negativity is a constraint applied
after each optimiser step (:meth:`CNNAEU.constrain`), as Keras' ``NonNeg``, not a reparametrisation.
"""
from __future__ import annotations

import torch
from torch import nn

# Keras' BatchNormalization defaults (momentum 0.99 there is 1 - 0.99 in PyTorch's convention)
_BN_MOMENTUM = 0.01
_BN_EPS = 1e-3


class CNNAEU(nn.Module):
    def __init__(self, bands: int, endmembers: int, filters: int = 48, leaky_slope: float = 0.02,
                 dropout: float = 0.2, decoder_kernel: int = 13, softmax_scale: float = 3.0,
                 init_std: float = 0.3):
        super().__init__()
        self.bands, self.count, self.softmax_scale = bands, endmembers, softmax_scale
        self.encoder = nn.Sequential(
            nn.Conv2d(bands, filters, 3, padding="same"),
            nn.LeakyReLU(leaky_slope),
            nn.BatchNorm2d(filters, eps=_BN_EPS, momentum=_BN_MOMENTUM),
            nn.Dropout2d(dropout),
            nn.Conv2d(filters, endmembers, 1),
            nn.BatchNorm2d(endmembers, eps=_BN_EPS, momentum=_BN_MOMENTUM),
            nn.Dropout2d(dropout),
        )
        self.decoder = nn.Conv2d(endmembers, bands, decoder_kernel, padding="same", bias=False)
        for module in (*self.encoder, self.decoder):
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def abundances(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, B, H, W] -> [N, R, H, W] on the simplex."""
        return torch.softmax(self.softmax_scale * self.encoder(x), dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(abundances [N, R, H, W], reconstruction [N, B, H, W])"""
        abundances = self.abundances(x)
        return abundances, self.decoder(abundances)

    @torch.no_grad()
    def constrain(self) -> None:
        """Project the decoder onto non-negative weights; call after every optimiser step."""
        self.decoder.weight.clamp_(min=0.0)

    def endmembers(self) -> torch.Tensor:
        """[R, B]: the decoder kernel [B, R, k, k] averaged spatially."""
        return self.decoder.weight.mean(dim=(2, 3)).t()


class ProjectionHead(nn.Module):
    """Per-sample embedding for the contrastive loss: the abundance maps [N, R, H, W] averaged over the image,
    then Linear + ReLU for each width in ``widths`` (R -> 128 -> 64 by default)."""

    def __init__(self, endmembers: int, widths: list[int] | tuple[int, ...] = (128, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        previous = endmembers
        for width in widths:
            layers += [nn.Linear(previous, width), nn.ReLU()]
            previous = width
        self.layers = nn.Sequential(*layers)

    def forward(self, abundances: torch.Tensor) -> torch.Tensor:
        return self.layers(abundances.mean(dim=(2, 3)))
