"""The denoiser: an attention UNet that maps (x_t, t, attributes) to the diffusion model's output.

Layout follows DDPM (Ho et al. 2020) and its PyTorch port used by DDIM: a stem conv, per resolution `num_res_blocks`
residual blocks (with self-attention at the resolutions in `attn_resolutions`) and a strided-conv downsample, a middle
block (res, attention, res), and an up path with `num_res_blocks + 1` blocks per resolution that each take one skip
connection, nearest-neighbour upsampling, then GroupNorm, SiLU and a zero-initialised output conv.

The model knows nothing of the noise schedule: `t` is only an integer fed to a sinusoidal embedding.

Conditioning (`cond_dim > 0`): a [B, cond_dim] attribute vector is embedded and added to the timestep embedding.
With `cond_free=True` (every model trained since attributes could be left free) each entry has three states: 1, 0,
or -1 = unknown ("free": the model draws it as the data has it). Each attribute owns a learned vector for "yes" and
one for "no", an unknown one contributes nothing, and their sum goes through a small MLP; a row of all -1 is the
unconditional model that classifier-free guidance contrasts with. With `cond_free=False` (the two-state models of
earlier versions, kept so their checkpoints load) entries are 0/1 and only a row of all -1 is special: a learned
null embedding. `cond=None` means all unknown / null for every row. With `cond_dim=0` there is no conditioning path
and `cond` is accepted and ignored.

Reference-face conditioning (`embed_dim = E > 0`, train.py --cond-embed): a frozen encoder's embedding of a face
(embed.py) rides in the same vector, after the attributes: cond = [attributes (cond_dim) | embedding (E) | flag],
width cond_dim + E + 1. The embedding is layer-normalised (encoders differ in scale), goes through an MLP and is added
to the timestep embedding like the attributes; a flag <= 0 replaces it with a learned null vector. So a row of all -1
is still "nothing given", and classifier-free guidance contrasts the reference (and the attributes) with it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from config import ConfigError

# Named architectures. `build_unet(name, **overrides)` builds one; every value here is a UNet keyword.
PRESETS: dict[str, dict[str, Any]] = {
    # ~1.1M parameters: CPU tests and the demo, at 32 px (also runs at 16 or 64 px with image_size overridden).
    "tiny": dict(
        image_size=32, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
        num_heads=2, dropout=0.0, num_groups=8,
    ),
    # ~35M parameters: 64 px on a 16 GB GPU at batch 128; multi-head attention at 16 and 8. 88 base channels land
    # on 35M with (1, 2, 2, 4) (96 would give 42M); 8 groups because 88 is not a multiple of 32, 2 heads so the head
    # widths (88, 176) are multiples of 8 as the flash kernels want.
    "small64": dict(
        image_size=64, base_channels=88, channel_mult=(1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16, 8),
        num_heads=2, dropout=0.1, num_groups=8,
    ),
    # DDIM's CelebA-64 model (the DDPM PyTorch port with ch_mult (1, 2, 2, 2, 4)): 78.7M parameters.
    "celeba64": dict(
        image_size=64, base_channels=128, channel_mult=(1, 2, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
        num_heads=1, dropout=0.1,
    ),
    # celeba64 with one more level in front for 128 px.
    "celeba128": dict(
        image_size=128, base_channels=128, channel_mult=(1, 1, 2, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
        num_heads=1, dropout=0.1,
    ),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, as in the Transformer and DDPM.

    t: [B] integers (or floats); returns [B, dim] float32 ([cos | sin] halves, zero-padded when dim is odd).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters so a residual branch starts as the identity (and the output conv starts at 0)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, then cast back.

    Autocast already runs group_norm in fp32 on CUDA; doing it explicitly keeps fp16/bf16 statistics stable on every
    backend (and with channels_last, which `.float()` preserves).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, add the (projected) embedding, GroupNorm -> SiLU -> dropout -> zero-init conv, + skip.

    With `use_scale_shift_norm` the embedding gives a per-channel (scale, shift) applied after the second norm
    (improved-diffusion), instead of being added after the first conv (DDPM).
    x: [B, in_ch, H, W], emb: [B, emb_dim] -> [B, out_ch, H, W].
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, num_groups: int,
                 use_scale_shift_norm: bool = False):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = GroupNorm32(num_groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if use_scale_shift_norm else out_ch)
        self.norm2 = GroupNorm32(num_groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        # A 1x1 conv matches channels on the skip path only where they change (DDPM's nin_shortcut).
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, with a zero-initialised output projection.

    Uses F.scaled_dot_product_attention, so flash / memory-efficient kernels are picked on GPU and the softmax is
    computed stably under fp16/bf16. x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int, num_heads: int, num_groups: int):
        super().__init__()
        if channels % num_heads:
            raise ConfigError(f"attention: {channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = GroupNorm32(num_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each [B, heads, HW, C/heads]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Halve H and W with a strided 3x3 conv. [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour then a 3x3 conv. [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """Attention UNet denoiser; `self.config` holds every constructor argument so `UNet(**m.config)` rebuilds it.

    image_size: training resolution (decides where attention sits; must divide by 2^(levels-1));
    in_channels: image channels (the output has as many); base_channels: C, the width of the first level;
    channel_mult: per-level width multipliers of C (one level per entry, halving the resolution between levels);
    num_res_blocks: res blocks per level on the way down (one more on the way up); attn_resolutions: resolutions
    that get self-attention after each res block; num_heads: attention heads; dropout: in every res block;
    cond_dim: length of the attribute vector (0: unconditional); cond_free: three-state attributes (1 / 0 / -1 free)
    instead of the older 0/1 vector with a null row; use_scale_shift_norm: the embedding scales and shifts the second
    norm instead of being added (improved-diffusion); num_groups: GroupNorm groups; embed_dim: length of the reference
    embedding that follows the attributes in `cond` (0: none; see the module's text).
    """

    def __init__(
        self,
        image_size: int = 64,
        in_channels: int = 3,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        num_heads: int = 1,
        dropout: float = 0.1,
        cond_dim: int = 0,
        cond_free: bool = False,
        use_scale_shift_norm: bool = False,
        num_groups: int = 32,
        embed_dim: int = 0,
    ):
        super().__init__()
        # Lists rather than tuples so the config survives a JSON round trip unchanged.
        self.config: dict[str, Any] = dict(
            image_size=int(image_size), in_channels=int(in_channels), base_channels=int(base_channels),
            channel_mult=[int(m) for m in channel_mult], num_res_blocks=int(num_res_blocks),
            attn_resolutions=[int(r) for r in attn_resolutions], num_heads=int(num_heads), dropout=float(dropout),
            cond_dim=int(cond_dim), use_scale_shift_norm=bool(use_scale_shift_norm), num_groups=int(num_groups),
        )
        if cond_free:  # only written when set, so that a two-state model's config (and checkpoint) reads as before
            self.config["cond_free"] = True
        if embed_dim:  # likewise: configs of models without a reference embedding read as before
            self.config["embed_dim"] = int(embed_dim)
        levels = len(channel_mult)
        if image_size % 2 ** (levels - 1):
            raise ConfigError(f"unet: image_size {image_size} is not divisible by 2^{levels - 1} for {levels} levels")
        for m in channel_mult:
            if (base_channels * m) % num_groups:
                raise ConfigError(f"unet: {base_channels * m} channels do not split into {num_groups} groups")
        self.image_size = image_size
        self.cond_dim = cond_dim
        self.cond_free = bool(cond_free) and cond_dim > 0
        self.embed_dim = int(embed_dim)
        self.cond_width = cond_dim + (self.embed_dim + 1 if self.embed_dim else 0)  # the width `cond` must have
        self.base_channels = base_channels
        emb_dim = 4 * base_channels

        def res_block(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, emb_dim, dropout, num_groups, use_scale_shift_norm)

        def attention(ch: int, res: int) -> nn.Module:
            return Attention(ch, num_heads, num_groups) if res in attn_resolutions else nn.Identity()

        # Timestep embedding: sinusoid of width base_channels, then an MLP to 4 * base_channels (DDPM).
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if self.cond_free:
            # [yes | no] indicators -> embedding: one learned vector per attribute and state (a Linear on the
            # indicators is exactly that sum), then an MLP so that attributes can interact (a hat hides the hair).
            self.cond_mlp = nn.Sequential(nn.Linear(2 * cond_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        elif cond_dim > 0:
            self.cond_proj = nn.Linear(cond_dim, emb_dim)
            self.null_emb = nn.Parameter(torch.zeros(emb_dim))
        if self.embed_dim:
            # No affine in the norm: the first Linear does that; the norm only puts every encoder on one scale.
            self.embed_mlp = nn.Sequential(nn.LayerNorm(self.embed_dim, elementwise_affine=False),
                                           nn.Linear(self.embed_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            self.embed_null = nn.Parameter(torch.zeros(emb_dim))  # "no reference": learnt with --p-uncond

        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # Down path: one stage per resolution, [res blocks, their attentions, downsample or None at the bottom].
        skip_chs = [base_channels]
        ch, res = base_channels, image_size
        self.downs = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            out_ch = base_channels * mult
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(res_block(ch, out_ch))
                attns.append(attention(out_ch, res))
                ch = out_ch
                skip_chs.append(ch)
            down = None
            if level < levels - 1:
                down = Downsample(ch)
                res //= 2
                skip_chs.append(ch)
            self.downs.append(nn.ModuleList([blocks, attns, down]))

        self.mid = nn.ModuleList([res_block(ch, ch), Attention(ch, num_heads, num_groups), res_block(ch, ch)])

        # Up path: num_res_blocks + 1 blocks per resolution, each eating one skip connection, then upsample.
        self.ups = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            out_ch = base_channels * mult
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(res_block(ch + skip_chs.pop(), out_ch))
                attns.append(attention(out_ch, res))
                ch = out_ch
            up = None
            if level > 0:
                up = Upsample(ch)
                res *= 2
            self.ups.append(nn.ModuleList([blocks, attns, up]))

        self.out = nn.Sequential(GroupNorm32(num_groups, ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, in_channels, 3, padding=1)))

    def embed(self, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Timestep (+ attributes, + reference) embedding. t: [B] ints, cond: [B, cond_width] (above) -> [B, 4*ch]."""
        emb = self.time_mlp(timestep_embedding(t, self.base_channels))
        if self.cond_width == 0:
            return emb
        if cond is None:
            cond = torch.full((t.shape[0], self.cond_width), -1.0, device=emb.device)
        elif cond.shape != (t.shape[0], self.cond_width):
            raise ValueError(f"unet: cond has shape {tuple(cond.shape)}, expected ({t.shape[0]}, {self.cond_width})")
        if self.embed_dim:
            ref, given = cond[:, self.cond_dim:-1], cond[:, -1:] > 0
            r = self.embed_mlp(ref.float())
            emb = emb + torch.where(given, r, self.embed_null.to(r.dtype).expand_as(r))
            if self.cond_dim == 0:
                return emb
            cond = cond[:, :self.cond_dim]
        return emb + self._attributes(cond)

    def _attributes(self, cond: torch.Tensor) -> torch.Tensor:
        """The attributes' part of the embedding; cond: [B, cond_dim]."""
        if self.cond_free:
            w = self.cond_mlp[0].weight
            states = torch.cat([cond > 0.5, (cond > -0.5) & (cond < 0.5)], dim=1).to(w.dtype)  # [yes | no]; -1: both 0
            return self.cond_mlp(states)
        cond = cond.to(self.cond_proj.weight.dtype)
        is_null = (cond < 0).all(dim=1, keepdim=True)
        c = self.cond_proj(cond.clamp(min=0))
        return torch.where(is_null, self.null_emb.to(c.dtype).expand_as(c), c)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, H, W], t: [B] integer timesteps in 0..T-1, cond: optional [B, cond_width] -> [B, C, H, W]."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.embed(t, cond)

        h = self.stem(x)
        skips = [h]
        for blocks, attns, down in self.downs:
            for block, attn in zip(blocks, attns):
                h = attn(block(h, emb))
                skips.append(h)
            if down is not None:
                h = down(h)
                skips.append(h)

        block1, attn, block2 = self.mid
        h = block2(attn(block1(h, emb)), emb)

        for blocks, attns, up in self.ups:
            for block, attn in zip(blocks, attns):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            if up is not None:
                h = up(h)

        return self.out(h)


def build_unet(name: str, **overrides: Any) -> UNet:
    """Build the preset `name` from PRESETS with keyword overrides (e.g. cond_dim=40, image_size=32)."""
    if name not in PRESETS:
        raise ConfigError(f"unet: unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return UNet(**{**PRESETS[name], **overrides})
