"""ADM UNet (Dhariwal & Nichol's "ablated diffusion model") with a registry of named sizes.

Structure: a stem conv, then per resolution level `num_res_blocks` ResBlocks (with multi-head
self-attention at the listed resolutions) and a downsampling step; a middle ResBlock-attention-
ResBlock; the mirrored decoder with skip connections; GroupNorm-SiLU-conv out. ResBlocks take
the timestep (+ class) embedding either as a bias or, with ``use_scale_shift_norm``, as an
adaptive GroupNorm: norm(h) * (1 + scale) + shift. The last conv of every ResBlock, attention
projection and output layer starts at zero, so the network starts as the identity on its skips.

Only GroupNorm is used (never BatchNorm): samples in a batch never interact, which the ANT
engine relies on when it runs one forward/backward per cluster sub-batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

__all__ = ["ADM_SIZES", "UNetModel", "timestep_embedding"]


def check_inputs(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None):
    """Shapes and dtypes only (no value reads: no host sync): clear errors where torch would
    raise an unrelated one or broadcast silently."""
    if x.dim() != 4 or x.shape[1] != model.in_channels:
        raise ValueError(
            f"x must be [B, {model.in_channels}, H, W] (in_channels={model.in_channels}), got "
            f"{tuple(x.shape)}"
        )
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be [B] = [{x.shape[0]}] timesteps, got shape {tuple(t.shape)}")
    if y is not None and (y.shape != (x.shape[0],) or y.dtype not in (torch.int64, torch.int32)):
        raise ValueError(
            f"y must be [B] = [{x.shape[0]}] integer class labels (int64 or int32), got shape "
            f"{tuple(y.shape)} and dtype {y.dtype}"
        )
    weight = model.input_layer.weight  # the layer that takes x
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(
            f"x is {x.dtype} but the model's input layer is {weight.dtype}: pass "
            f"x.to({weight.dtype}), or keep the model in float32 and run it under torch.autocast"
        )


def check_sizes(**sizes: Any) -> None:
    """Constructor sizes that must be positive integers (a 0 gave a ZeroDivisionError or an
    empty model), named as the override that sets them. ``num_classes`` may also be None."""
    for key, value in sizes.items():
        if key == "num_classes" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            hint = " (None for an unconditional model)" if key == "num_classes" else ""
            raise ValueError(
                f"{key} must be a positive integer{hint}, got {value!r} "
                f"(--model.overrides.{key})"
            )


def label_embedding(model: nn.Module, embed: nn.Embedding | None, y: torch.Tensor | None):
    """Class embedding of y (0 for unconditional models), with label dropout in training.

    Dropped labels become the null class ``model.num_classes`` (classifier-free guidance).
    """
    if embed is None:
        if y is not None:
            raise ValueError("y was given but this model is unconditional (num_classes=None)")
        return 0.0
    if y is None:
        raise ValueError(
            f"this model is class-conditional: pass y (null class = {model.num_classes} for "
            "unconditional)"
        )
    if model.training and model.class_dropout_prob > 0:
        drop = torch.rand(y.shape, device=y.device) < model.class_dropout_prob
        y = torch.where(drop, torch.full_like(y, model.num_classes), y)
    return embed(y)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps. t: [B] -> [B, dim] (cos half, sin half)."""
    if dim < 2:  # no sinusoid fits: the embedding would be zeros, blind to t
        raise ValueError(f"the timestep embedding needs dim >= 2, got {dim}")
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, as ADM, where ch is a multiple of 32; narrower or odd widths
    (the tiny CPU sizes) take gcd(32, ch) groups: 8 channels -> 8 groups, 33 -> 1 group (a
    LayerNorm over the channels), so keep model_channels * channel_mult multiples of 32 for the
    published architecture."""
    return nn.GroupNorm(math.gcd(32, ch), ch)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding; optionally resamples by 2 ("up"/"down")."""

    def __init__(
        self,
        ch: int,
        emb_dim: int,
        out_ch: int,
        dropout: float,
        scale_shift: bool,
        resample: str | None = None,
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.resample = resample
        self.in_norm, self.in_conv = _norm(ch), nn.Conv2d(ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.out_norm, self.drop = _norm(out_ch), nn.Dropout(dropout)
        self.out_conv = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(self._resample(F.silu(self.in_norm(x))))
        x = self._resample(x)
        e = self.emb(F.silu(emb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1.0 + scale) + shift
        else:
            h = self.out_norm(h + e)
        h = self.out_conv(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions of one sample."""

    def __init__(self, ch: int, num_heads: int, num_head_channels: int) -> None:
        super().__init__()
        if num_head_channels > 0:
            if ch % num_head_channels:
                raise ValueError(
                    f"channels {ch} not divisible by num_head_channels {num_head_channels}"
                )
            num_heads = ch // num_head_channels
        if ch % num_heads:
            raise ValueError(f"channels {ch} not divisible by num_heads {num_heads}")
        self.heads = num_heads
        self.norm = _norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv1d(ch, ch, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, hh * ww))  # [B, 3C, N]
        # channels as [q | k | v], each split into heads (not q, k, v per head): weights saved
        # with the per-head layout need their qkv rows permuted to load here
        q, k, v = (
            qkv.reshape(b, 3, self.heads, c // self.heads, hh * ww).transpose(-1, -2).unbind(1)
        )
        h = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, C/heads]
        h = h.transpose(-1, -2).reshape(b, c, hh * ww)
        return x + self.proj(h).reshape(b, c, hh, ww)


class Downsample(nn.Module):
    def __init__(self, ch: int, use_conv: bool) -> None:
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int, use_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Stage(nn.ModuleList):
    """A list of layers that all receive (x, emb); plain convs ignore emb."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x) if isinstance(layer, nn.Conv2d) else layer(x, emb)
        return x


class UNetModel(nn.Module):
    """ADM UNet. Called as model(x [B, C, H, W], t [B] int64, y [B] int64 | None).

    Args:
        image_size: H = W of the input (used to place attention by resolution). The network
            is fully convolutional: another size divisible by the downsamplings runs too, with
            attention at the same levels (so at other resolutions than named).
        in_channels: C.
        model_channels: base width; level l has model_channels * channel_mult[l] channels.
        num_res_blocks: ResBlocks per level in the encoder (decoder has one more).
        attention_resolutions: feature-map sizes (e.g. (16,)) that get self-attention.
        channel_mult: width multiplier per level; len(channel_mult) - 1 downsamplings.
        num_heads / num_head_channels: heads per attention (num_head_channels > 0 wins).
        use_scale_shift_norm: adaptive GroupNorm conditioning.
        resblock_updown: resample with ResBlocks instead of conv / avg-pool layers.
        num_classes: class-conditional if set; label num_classes is the null class for CFG.
        class_dropout_prob: in training mode, each label becomes the null class with this prob.
        learn_sigma: output 2C channels (mean + variance interpolation).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int = 3,
        model_channels: int = 128,
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        dropout: float = 0.0,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
        conv_resample: bool = True,
        num_classes: int | None = None,
        class_dropout_prob: float = 0.0,
        learn_sigma: bool = False,
    ) -> None:
        super().__init__()
        if (
            isinstance(channel_mult, (str, bytes))
            or not isinstance(channel_mult, Sequence)
            or not len(channel_mult)
            or not all(isinstance(m, int) and not isinstance(m, bool) and m > 0
                       for m in channel_mult)
        ):  # fmt: skip
            raise ValueError(
                f"channel_mult must list one positive width multiplier per level, e.g. "
                f"[1, 2, 2], got {channel_mult!r} (--model.overrides.channel_mult)"
            )
        check_sizes(image_size=image_size, in_channels=in_channels,
                    model_channels=model_channels, num_res_blocks=num_res_blocks,
                    num_classes=num_classes)  # fmt: skip
        if num_head_channels <= 0:
            check_sizes(num_heads=num_heads)
        levels = [image_size // 2**i for i in range(len(channel_mult))]
        if image_size % 2 ** (len(channel_mult) - 1):
            m = 2 ** (len(channel_mult) - 1)
            raise ValueError(
                f"image_size {image_size} is not divisible by {m} = 2^{len(channel_mult) - 1}: "
                f"the model halves it at each of its {len(channel_mult)} levels but the last. "
                f"Resize the images (--data.image_size, a multiple of {m}) or use fewer levels "
                "(--model.overrides.channel_mult, e.g. '[1, 2]')"
            )
        if isinstance(attention_resolutions, int) and not isinstance(attention_resolutions, bool):
            attention_resolutions = (attention_resolutions,)  # one size, as a CLI value gives it
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in attention_resolutions):
            raise ValueError(
                "attention_resolutions must be feature-map sizes (integers), e.g. [16] or "
                "[16, 8] (--model.overrides.attention_resolutions '[16, 8]'), got "
                f"{attention_resolutions!r}"
            )
        missing = sorted(set(attention_resolutions) - set(levels))
        if missing:
            raise ValueError(
                f"attention_resolutions {missing} never occur at image_size {image_size}: the "
                f"levels are {levels}. Choose among them (--model.overrides."
                "attention_resolutions '[8]', or in a config), e.g. scaled with the image size"
            )
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
        self.in_channels, self.model_channels = in_channels, model_channels
        self.num_downsamples = len(channel_mult) - 1
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

        def res(ci: int, co: int, resample: str | None = None) -> ResBlock:
            return ResBlock(ci, emb_dim, co, dropout, use_scale_shift_norm, resample)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, num_heads, num_head_channels)

        ch = model_channels * channel_mult[0]
        self.input_blocks = nn.ModuleList([_Stage([nn.Conv2d(in_channels, ch, 3, padding=1)])])
        skips = [ch]
        for lvl, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                stage = _Stage([res(ch, model_channels * mult)])
                ch = model_channels * mult
                if levels[lvl] in attention_resolutions:
                    stage.append(attn(ch))
                self.input_blocks.append(stage)
                skips.append(ch)
            if lvl != len(channel_mult) - 1:
                down = res(ch, ch, "down") if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(_Stage([down]))
                skips.append(ch)
        self.middle_block = _Stage([res(ch, ch), attn(ch), res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for lvl, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                stage = _Stage([res(ch + skips.pop(), model_channels * mult)])
                ch = model_channels * mult
                if levels[lvl] in attention_resolutions:
                    stage.append(attn(ch))
                if lvl and i == num_res_blocks:
                    stage.append(
                        res(ch, ch, "up") if resblock_updown else Upsample(ch, conv_resample)
                    )
                self.output_blocks.append(stage)
        self.out = nn.Sequential(
            _norm(ch), nn.SiLU(), _zero(nn.Conv2d(ch, self.out_channels, 3, padding=1))
        )

    @property
    def input_layer(self) -> nn.Conv2d:
        """The layer that takes x (its dtype is the one x must have without autocast)."""
        return self.input_blocks[0][0]

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [B, C, H, W], t: [B] int64, y: [B] int64 -> [B, C or 2C, H, W].

        y holds labels in [0, num_classes], num_classes being the null (unconditional) label;
        they are not range-checked here (that would read them on the host): the trainer's data
        loaders check them, and an out-of-range label is an index error (on a GPU a device-side
        assert)."""
        check_inputs(self, x, t, y)
        down = 2**self.num_downsamples
        if x.shape[2] % down or x.shape[3] % down:
            raise ValueError(
                f"H and W must be divisible by 2^{self.num_downsamples} = {down} (the "
                f"downsamplings), got {tuple(x.shape)}"
            )
        # The sinusoids are made in float32; a model cast to bf16 / fp16 (not autocast) needs
        # them in its own dtype before the first linear layer.
        freqs = timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(freqs)
        emb = emb + label_embedding(self, self.label_emb, y)
        hs, h = [], x
        for stage in self.input_blocks:
            h = stage(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for stage in self.output_blocks:
            h = stage(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


# The paper's ADM-light for FFHQ 256, a CPU-sized digits model, and a slightly larger one.
ADM_SIZES: dict[str, dict] = {
    "adm-light": dict(
        image_size=256,
        in_channels=3,
        model_channels=128,
        num_res_blocks=1,
        attention_resolutions=(16,),
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_head_channels=64,
        use_scale_shift_norm=True,
        resblock_updown=True,
        learn_sigma=True,
    ),
    "adm-tiny": dict(
        image_size=8,
        in_channels=1,
        model_channels=32,
        num_res_blocks=1,
        attention_resolutions=(4,),
        channel_mult=(1, 2),
        num_head_channels=32,
        use_scale_shift_norm=True,
        resblock_updown=False,
    ),
    "adm-small": dict(
        image_size=16,
        in_channels=1,
        model_channels=64,
        num_res_blocks=2,
        attention_resolutions=(8,),
        channel_mult=(1, 2, 2),
        num_head_channels=32,
        use_scale_shift_norm=True,
        resblock_updown=True,
    ),
}
