"""The spectral masked autoencoder: wavelength-conditioned tokens -> ViT encoder on the visible ones -> light
decoder over all tokens -> every band of every pixel, plus the optional KARMA LSMM branch.

Shape of the computation (MAE, He et al. 2022, in one file on purpose):
    hsi [N, B, H, W], wavelengths [N, B]
      -> SpectralPatchEmbed -> tokens [N, G, P, D] (+ 2-D sin-cos position, + learned group embedding)
      -> per-sample random masking (argsort of noise) -> encoder on [cls + visible]
      -> decoder: mask tokens re-inserted, positions again -> SpectralPatchDecoder -> prediction [N, B, H, W]
      -> (LSMMHead on the patch-mean decoder features -> abundances; endmembers at the band centres)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hsfm_train.errors import ConfigError
from hsfm_train.models.heads import LSMMHead
from hsfm_train.models.tokenizers import SpectralPatchDecoder, SpectralPatchEmbed
from hsfm_train.models.vit import Block, init_weights, run_blocks, sincos_2d


@dataclass
class LSMMConfig:
    num_endmembers: int = 0  # 0: no physics branch (plain MAE)
    resolution: str = "patch"  # "patch" (KARMA) or "pixel"
    grid_start_nm: float = 350.0
    grid_stop_nm: float = 2550.0
    grid_step_nm: float = 10.0
    init: str = "random"  # "random" (KARMA), "library" (USGS spectra shipped in the package) or "vca" (from data)

    def grid(self) -> torch.Tensor:
        count = int(round((self.grid_stop_nm - self.grid_start_nm) / self.grid_step_nm)) + 1
        return torch.linspace(self.grid_start_nm, self.grid_stop_nm, count)


@dataclass
class ModelConfig:
    name: str = "tiny"
    patch_size: int = 8
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 96
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    spectral_channels: int = 32  # K learned spectral response functions (virtual sensor bands)
    spectral_basis: int = 32  # K' spectral basis vectors the decoder predicts per pixel
    group_edges_nm: list[float] = field(default_factory=lambda: [1000.0, 100000.0])  # VNIR | SWIR | microwave
    mask_ratio: float = 0.75
    # chance per training sample that one whole spectral group is masked first (all its patches), so that group
    # must be predicted from the others (samples with one group are masked as usual)
    group_mask_prob: float = 0.0
    drop_path: float = 0.0
    # recompute each encoder/decoder block in backward instead of keeping its activations (training with grad
    # only): less memory for ~one extra forward of the blocks; the maths, the losses and the gradients are the same
    activation_checkpointing: bool = False
    lsmm: LSMMConfig = field(default_factory=LSMMConfig)

    def __post_init__(self) -> None:
        if isinstance(self.lsmm, dict):
            self.lsmm = LSMMConfig(**self.lsmm)
        problems = []
        for dim, heads, where in ((self.embed_dim, self.num_heads, "embed_dim/num_heads"),
                                  (self.decoder_embed_dim, self.decoder_num_heads,
                                   "decoder_embed_dim/decoder_num_heads")):
            if dim % heads:
                problems.append(f"{where}: {dim} is not divisible by {heads}")
        for dim, where in ((self.embed_dim, "embed_dim"), (self.decoder_embed_dim, "decoder_embed_dim")):
            if dim % 4:
                problems.append(f"{where} {dim} must be divisible by 4 (2-D sin-cos positions)")
        if not 0.0 <= self.mask_ratio < 1.0:
            problems.append(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.group_mask_prob <= 1.0:
            problems.append(f"group_mask_prob must be in [0, 1], got {self.group_mask_prob}")
        if sorted(self.group_edges_nm) != list(self.group_edges_nm):
            problems.append(f"group_edges_nm must increase, got {self.group_edges_nm}")
        if self.lsmm.resolution not in ("patch", "pixel"):
            problems.append(f"lsmm.resolution must be 'patch' or 'pixel', got {self.lsmm.resolution!r}")
        if self.lsmm.init not in ("random", "library", "vca"):
            problems.append(f"lsmm.init must be random, library or vca, got {self.lsmm.init!r}")
        if problems:
            raise ConfigError(f"model '{self.name}': " + "; ".join(problems))


class MAEOutput(dict):
    """What ``SpectralMAE.forward`` returns: a dict of its fields with attribute access. A dict, not a dataclass,
    so that engines which hook the tensors a module returns (DeepSpeed ZeRO-3 gathers parameters again for the
    backward that way) see every one of them."""

    def __init__(self, prediction: torch.Tensor, token_mask: torch.Tensor, membership: torch.Tensor,
                 present: torch.Tensor, patch_size: int, latent: torch.Tensor, decoder_features: torch.Tensor,
                 abundances: torch.Tensor | None = None, visible_ids: torch.Tensor | None = None):
        super().__init__(
            prediction=prediction,  # [N, B, H, W], in the (normalised) units of the input
            token_mask=token_mask,  # [N, G, P] bool, True = masked (to reconstruct)
            membership=membership,  # [N, B, G_all] bool: which spectral group each band belongs to
            present=present,  # [G] ids of the groups that have tokens in this batch
            patch_size=patch_size,
            latent=latent,  # encoder output [N, 1 + visible, D]
            decoder_features=decoder_features,  # [N, G, P, Dd]
            abundances=abundances,  # [N, P, M] or [N, P, p*p, M]
            visible_ids=visible_ids)  # [N, visible] the token (group-major) each latent token after cls came from

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"MAEOutput has no field {name!r}") from None

    def replace(self, **changes: Any) -> MAEOutput:
        return MAEOutput(**{**self, **changes})

    def band_mask(self) -> torch.Tensor:
        """[N, B, H, W] bool: the band-pixels whose token was masked (what the reconstruction losses score)."""
        rows, cols = self.grid
        p = self.patch_size
        tokens = self.token_mask.view(*self.token_mask.shape[:2], rows, cols).float()
        pixels = tokens.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)  # [N, G, H, W]
        member = self.membership[..., self.present].float()  # [N, B, G]
        return torch.einsum("nbg,nghw->nbhw", member, pixels) > 0.5

    @property
    def grid(self) -> tuple[int, int]:
        height, width = self.prediction.shape[-2:]
        return height // self.patch_size, width // self.patch_size


class SpectralMAE(nn.Module):
    """``with_decoder=False`` builds the encoder only (an encoder-only export loads into it)."""

    def __init__(self, config: ModelConfig, with_decoder: bool = True):
        super().__init__()
        self.config = config
        self.with_decoder = with_decoder
        c = config
        self.patch_embed = SpectralPatchEmbed(c.embed_dim, c.patch_size, c.spectral_channels, c.group_edges_nm)
        groups = self.patch_embed.num_groups
        self.group_embed = nn.Parameter(torch.zeros(groups, c.embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        rates = torch.linspace(0, c.drop_path, c.depth, device="cpu").tolist()  # cpu: buildable on "meta" too
        self.blocks = nn.ModuleList(Block(c.embed_dim, c.num_heads, c.mlp_ratio, drop_path=r) for r in rates)
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        if with_decoder:
            self._build_decoder(c, groups)
        else:
            self.lsmm = None
        self._initialise()

    def _build_decoder(self, c: ModelConfig, groups: int) -> None:
        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim))
        self.decoder_group_embed = nn.Parameter(torch.zeros(groups, c.decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(c.decoder_embed_dim, c.decoder_num_heads, c.mlp_ratio) for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(c.decoder_embed_dim, eps=1e-6)
        self.decoder_head = SpectralPatchDecoder(c.decoder_embed_dim, c.patch_size, c.spectral_basis, groups)
        self.lsmm = (LSMMHead(c.decoder_embed_dim, c.lsmm.num_endmembers, c.lsmm.grid(), c.patch_size,
                              c.lsmm.resolution) if c.lsmm.num_endmembers > 0 else None)

    def _initialise(self) -> None:
        self.apply(init_weights)
        for name, parameter in self.named_parameters():
            if name in ("cls_token", "mask_token", "group_embed", "decoder_group_embed"):
                nn.init.normal_(parameter, std=0.02)
        for projection in self.patch_embed.projections:  # MAE: patch projection initialised like a linear layer
            nn.init.xavier_uniform_(projection.weight.view(projection.weight.shape[0], -1))

    # ------------------------------------------------------------------------------------------------ encoder

    def _tokens(self, hsi: torch.Tensor, wavelengths: torch.Tensor, band_mask: torch.Tensor | None):
        if band_mask is None:
            band_mask = torch.ones(wavelengths.shape, dtype=torch.bool, device=hsi.device)
        if wavelengths.dim() == 1:
            wavelengths = wavelengths.expand(hsi.shape[0], -1)
        tokens, membership, present = self.patch_embed(hsi, wavelengths, band_mask)
        rows, cols = hsi.shape[-2] // self.config.patch_size, hsi.shape[-1] // self.config.patch_size
        position = sincos_2d(self.config.embed_dim, rows, cols, hsi.device)
        tokens = tokens + position + self.group_embed[present][:, None, :]
        return tokens, membership, present, wavelengths

    def encode(self, hsi: torch.Tensor, wavelengths: torch.Tensor, band_mask: torch.Tensor | None = None
               ) -> torch.Tensor:
        """All tokens, no masking: [N, 1 + G*P, D] (cls first) for downstream heads."""
        tokens, *_ = self._tokens(hsi, wavelengths, band_mask)
        return self._encoder(tokens.flatten(1, 2))

    def _encoder(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.norm(run_blocks(self.blocks, x, self._checkpointing()))

    def _checkpointing(self) -> bool:
        """Whether the blocks run under activation checkpointing now: configured, training, grad enabled."""
        return self.config.activation_checkpointing and self.training and torch.is_grad_enabled()

    # ---------------------------------------------------------------------------------------------- masking

    @staticmethod
    def random_masking(count: int, groups: int, patches: int, ratio: float, generator: torch.Generator | None,
                       device: torch.device, spatial: bool = False, group_mask_prob: float = 0.0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking by argsort of uniform noise over the G*P tokens: (kept ids, mask [N, G*P]
        True = masked, restore order). Groups are masked independently (training); ``spatial`` masks whole
        patches across all groups (evaluation: a masked pixel has no band left visible). With
        ``group_mask_prob``, a sample (with G >= 2) has one random group's tokens pushed to the front of the
        masking order, so that group is masked entirely whenever the ratio allows (0.75 of 2 groups: all of one,
        half of the other); the token count per sample stays the same."""
        tokens = groups * patches
        source = generator.device if generator is not None else device
        if spatial:
            keep = groups * min(patches, max(1, int(patches * (1 - ratio))))
            noise = torch.rand(count, 1, patches, generator=generator, device=source).expand(-1, groups, -1)
            noise = noise.flatten(1)
        else:
            keep = min(tokens, max(1, int(tokens * (1 - ratio))))
            noise = torch.rand(count, tokens, generator=generator, device=source)
            if group_mask_prob > 0 and groups > 1:
                chosen = torch.randint(groups, (count, 1), generator=generator, device=source)
                hit = torch.rand(count, 1, generator=generator, device=source) < group_mask_prob
                group_of_token = torch.arange(groups, device=source).repeat_interleave(patches)[None]
                noise = noise + ((group_of_token == chosen) & hit).float()  # sorted last: masked first
        shuffle = noise.to(device).argsort(dim=1, stable=True)
        restore = shuffle.argsort(dim=1)
        mask = torch.ones(count, tokens, dtype=torch.bool, device=device)
        mask[:, :keep] = False
        return shuffle[:, :keep], mask.gather(1, restore), restore

    def _decoder(self, cls: torch.Tensor, tokens: torch.Tensor, present: torch.Tensor, grid: tuple[int, int]
                 ) -> torch.Tensor:
        """Decoder tokens [N, G, P, Dd] (after decoder_embed, mask tokens in place) -> features [N, G, P, Dd]."""
        n, groups, patches, dim = tokens.shape
        tokens = tokens + sincos_2d(dim, *grid, tokens.device) + self.decoder_group_embed[present][:, None, :]
        x = torch.cat([cls, tokens.flatten(1, 2)], dim=1)
        x = run_blocks(self.decoder_blocks, x, self._checkpointing())
        return self.decoder_norm(x)[:, 1:].view(n, groups, patches, dim)

    def decoder_features(self, hsi: torch.Tensor, wavelengths: torch.Tensor, band_mask: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """The decoder's features of every token with nothing masked: [N, G*P, Dd] (group-major, like encode's
        patch tokens), a read-out at the decoder's level for downstream probes."""
        if not self.with_decoder:
            raise RuntimeError("this backbone was loaded encoder-only: it has no decoder features")
        tokens, _, present, _ = self._tokens(hsi, wavelengths, band_mask)
        n, groups, patches, _ = tokens.shape
        y = self.decoder_embed(self._encoder(tokens.flatten(1, 2)))
        grid = (hsi.shape[-2] // self.config.patch_size, hsi.shape[-1] // self.config.patch_size)
        return self._decoder(y[:, :1], y[:, 1:].view(n, groups, patches, -1), present, grid).flatten(1, 2)

    # ---------------------------------------------------------------------------------------------- forward

    def forward(self, hsi: torch.Tensor, wavelengths: torch.Tensor, band_mask: torch.Tensor | None = None,
                mask_ratio: float | None = None, generator: torch.Generator | None = None,
                spatial_masking: bool = False) -> MAEOutput:
        if not self.with_decoder:
            raise RuntimeError("this backbone was loaded encoder-only: use encode(), or export with the decoder")
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        tokens, membership, present, wavelengths = self._tokens(hsi, wavelengths, band_mask)
        n, groups, patches, dim = tokens.shape
        flat = tokens.flatten(1, 2)
        group_mask_prob = 0.0 if (spatial_masking or not self.training) else self.config.group_mask_prob
        kept, mask, restore = self.random_masking(n, groups, patches, ratio, generator, hsi.device, spatial_masking,
                                                  group_mask_prob)
        visible = flat.gather(1, kept.unsqueeze(-1).expand(-1, -1, dim))
        latent = self._encoder(visible)

        y = self.decoder_embed(latent)
        masked_count = groups * patches - kept.shape[1]
        y_tokens = torch.cat([y[:, 1:], self.mask_token.expand(n, masked_count, -1)], dim=1)
        y_tokens = y_tokens.gather(1, restore.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
        rows, cols = hsi.shape[-2] // self.config.patch_size, hsi.shape[-1] // self.config.patch_size
        features = self._decoder(y[:, :1], y_tokens.view(n, groups, patches, -1), present, (rows, cols))

        prediction = self.decoder_head(features, wavelengths, membership, present, (rows, cols))
        abundances = self.lsmm.abundances(features.mean(dim=1)) if self.lsmm is not None else None
        return MAEOutput(prediction=prediction, token_mask=mask.view(n, groups, patches), membership=membership,
                         present=present, patch_size=self.config.patch_size, latent=latent,
                         decoder_features=features, abundances=abundances, visible_ids=kept)
