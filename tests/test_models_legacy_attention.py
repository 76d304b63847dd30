"""ADM's default ("legacy") attention lays its qkv rows out per head as [q, k, v]; the
AttentionBlock here as [q | k | v], each split into heads: weights of the legacy layout load
after permuting those rows (as adm.py's comment says), and then compute the same block."""

from __future__ import annotations

import math

import torch

from antdiff.models.adm import AttentionBlock


def _legacy_attention(blk: AttentionBlock, qkv_w, qkv_b, x: torch.Tensor) -> torch.Tensor:
    """The legacy layout written out: rows of qkv grouped by head, then q, k, v in each head."""
    b, c, hh, ww = x.shape
    n, heads = hh * ww, blk.heads
    d = c // heads
    h = blk.norm(x).reshape(b, c, n)
    qkv = torch.einsum("oc,bcn->bon", qkv_w, h) + qkv_b[None, :, None]  # [B, 3C, N]
    qkv = qkv.reshape(b, heads, 3, d, n)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, heads, d, N]
    w = torch.softmax(torch.einsum("bhdt,bhds->bhts", q, k) / math.sqrt(d), dim=-1)
    a = torch.einsum("bhts,bhds->bhdt", w, v).reshape(b, c, n)
    return x + blk.proj(a).reshape(b, c, hh, ww)


def test_legacy_qkv_rows_load_after_the_documented_permutation():
    torch.manual_seed(0)
    c, heads = 32, 4
    blk = AttentionBlock(c, num_heads=heads, num_head_channels=-1)
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    legacy_w = torch.randn(3 * c, c) * 0.3  # a legacy checkpoint's qkv (1x1 conv) rows
    legacy_b = torch.randn(3 * c) * 0.3
    d = c // heads

    def to_antdiff(rows: torch.Tensor) -> torch.Tensor:  # [head, qkv, d] -> [qkv, head, d]
        return rows.reshape(heads, 3, d, *rows.shape[1:]).transpose(0, 1).reshape(rows.shape)

    with torch.no_grad():
        blk.qkv.weight.copy_(to_antdiff(legacy_w)[:, :, None])
        blk.qkv.bias.copy_(to_antdiff(legacy_b))
        x = torch.randn(2, c, 4, 4)
        torch.testing.assert_close(
            blk(x), _legacy_attention(blk, legacy_w, legacy_b, x), rtol=1e-4, atol=1e-5
        )
