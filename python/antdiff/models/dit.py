"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") with named sizes.

The image (or latent) [B, C, H, W] is cut into p x p patches, embedded linearly, given a fixed
2-D sin-cos position embedding, and processed by `depth` transformer blocks conditioned with
adaLN-Zero: a per-block MLP of c = t_emb (+ y_emb) produces shift/scale/gate for the attention
and MLP branches; the gates and the final layer start at zero so every block starts as the
identity. Labels: num_classes is the null class used for classifier-free guidance, and in
training mode each label is dropped to it with probability class_dropout_prob.

LayerNorm only: samples never interact, which the ANT per-cluster backward relies on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from antdiff.models.adm import check_inputs, check_sizes, label_embedding, timestep_embedding

__all__ = ["DIT_SIZES", "DiT", "sincos_pos_embed_2d"]


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding [grid*grid, dim]: the first half of the channels encodes
    the row, the second half the column. The public DiT code puts the column half first: the
    same embedding up to a channel permutation, which training from scratch does not notice,
    but weights trained with that code need the two halves of this table swapped."""
    if dim % 4:
        raise ValueError(f"hidden size must be divisible by 4 for 2-D sin-cos, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def embed_1d(p: torch.Tensor) -> torch.Tensor:
        ang = p.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)

    return torch.cat([embed_1d(rows), embed_1d(cols)], dim=1).float()


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1.0 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by num_heads {heads}")
        if not mlp_ratio > 0 or int(hidden * mlp_ratio) < 1:
            raise ValueError(
                f"mlp_ratio must give an MLP at least 1 wide (hidden {hidden} x mlp_ratio), got "
                f"{mlp_ratio} (--model.overrides.mlp_ratio 4.0)"
            )
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, hidden)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, d/heads]
        return self.proj(h.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        x = x + g1[:, None] * self._attn(_modulate(self.norm1(x), sh1, sc1))
        return x + g2[:, None] * self.mlp(_modulate(self.norm2(x), sh2, sc2))


class DiT(nn.Module):
    """Diffusion transformer. Called as model(x [B, C, H, W], t [B] int64, y [B] int64 | None).

    Args:
        input_size: H = W of the input; must be divisible by patch_size.
        patch_size: p; the sequence has (H / p)^2 tokens.
        in_channels: C.
        hidden_size, depth, num_heads: transformer width, blocks, heads.
        mlp_ratio: MLP width / hidden size.
        num_classes: class-conditional if set (label num_classes = null class).
        class_dropout_prob: label dropout in training mode, for classifier-free guidance.
        learn_sigma: output 2C channels (mean + variance interpolation).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int | None = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        frequency_embedding_size: int = 256,
    ) -> None:
        super().__init__()
        check_sizes(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                    hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                    num_classes=num_classes,
                    frequency_embedding_size=frequency_embedding_size)  # fmt: skip
        if input_size % patch_size:
            raise ValueError(
                f"input_size {input_size} is not divisible by patch_size {patch_size}: set "
                "--data.image_size (or the latents' size) to a multiple of it, or "
                "--model.overrides.patch_size to a divisor of it"
            )
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.learn_sigma = learn_sigma
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        self.freq_dim = frequency_embedding_size
        self.grid = input_size // patch_size
        self.patch = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False
        )
        self.t_embed = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.y_embed = nn.Embedding(num_classes + 1, hidden_size) if num_classes else None
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)]
        )
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self._init_weights()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # the fixed position table is not in state dicts: a model built on the meta device and
        # materialised with to_empty() holds uninitialised memory there until it is rebuilt
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        with torch.no_grad():
            table = sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid)[None]
            self.pos_embed.copy_(table.to(self.pos_embed.device, self.pos_embed.dtype))

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch.bias)
        for m in (self.t_embed[0], self.t_embed[2]):
            nn.init.normal_(m.weight, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.ada[1].weight)
            nn.init.zeros_(block.ada[1].bias)
        for m in (self.final_ada[1], self.final):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W] (token order row-major, within a patch (i, j, c))."""
        b, g, p, c = x.shape[0], self.grid, self.patch_size, self.out_channels
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    @property
    def input_layer(self) -> nn.Conv2d:
        """The layer that takes x (its dtype is the one x must have without autocast)."""
        return self.patch

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [B, C, H, W], t: [B] int64, y: [B] int64 -> [B, C or 2C, H, W].

        y holds labels in [0, num_classes], num_classes being the null (unconditional) label;
        they are not range-checked here (that would read them on the host): the trainer's data
        loaders check them, and an out-of-range label is an index error (on a GPU a device-side
        assert)."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"x must be [B, C, {self.input_size}, {self.input_size}], got {tuple(x.shape)}"
            )
        check_inputs(self, x, t, y)
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, N, D]
        c = self.t_embed(timestep_embedding(t, self.freq_dim).to(self.t_embed[0].weight.dtype))
        c = c + label_embedding(self, self.y_embed, y)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=1)
        return self.unpatchify(self.final(_modulate(self.final_norm(h), shift, scale)))


_DIT_SHAPES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

# ImageNet-256 on SD-VAE latents (32x32x4), 1000 classes, learned sigma, as in the DiT paper.
DIT_SIZES: dict[str, dict] = {
    f"DiT-{s}/{p}": dict(
        input_size=32,
        patch_size=p,
        in_channels=4,
        depth=d,
        hidden_size=h,
        num_heads=n,
        num_classes=1000,
        class_dropout_prob=0.1,
        learn_sigma=True,
    )
    for s, (d, h, n) in _DIT_SHAPES.items()
    for p in (2, 4, 8)
}
DIT_SIZES["dit-tiny"] = dict(
    input_size=8,
    patch_size=2,
    in_channels=1,
    depth=2,
    hidden_size=64,
    num_heads=4,
    num_classes=10,
    class_dropout_prob=0.1,
    learn_sigma=False,
)
