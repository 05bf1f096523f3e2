"""Vision Transformer backbone (paper Sec. 3.2 "Implementation and evaluation protocols"; Dosovitskiy et al. 2021).

The state_dict has exactly the names and shapes of the official DINO ViT, so its pretrained backbone files
load with strict=True, and the numerics match: pre-norm blocks, LayerNorm eps 1e-6, qkv with bias, exact
GELU, attention scale head_dim^-0.5, CLS token first, learned position embeddings for a 224 px input that are
interpolated bicubically for any other size whose sides are multiples of the patch size.

Shape letters: B images, N patches (+1 with the CLS token), D width, H heads.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def drop_path(x, drop_prob, training):
    """Stochastic depth: drop the whole residual branch of a sample with probability drop_prob."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
    return x * mask / keep


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attention=False):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, D/H)
        if return_attention:
            # softmax(q k^T / sqrt(d)): computed explicitly only when the weights are asked for
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
            return attn
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, H, N, D/H)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()  # exact (erf) GELU, as the official ViT
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)), each branch with drop path."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_prob = drop_path  # the official name of the argument; drop_path() is the function

    def forward(self, x, return_attention=False):
        if return_attention:
            return self.attn(self.norm1(x), return_attention=True)
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_prob, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_prob, self.training)
        return x


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping p x p patches and project each to D (a strided convolution)."""

    def __init__(self, patch_size, embed_dim, in_chans=3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x, stride=None):
        """stride < patch size: overlapping patches, the same weights (dense.py's finer grid); (B, N, D)."""
        x = self.proj(x) if stride in (None, self.patch_size) else F.conv2d(x, self.proj.weight, self.proj.bias,
                                                                           stride=stride)
        return x.flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)


class VisionTransformer(nn.Module):
    def __init__(self, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                 drop_path_rate=0.0, img_size=224, in_chans=3):
        super().__init__()
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.num_features = embed_dim
        self.patch_embed = PatchEmbed(patch_size, embed_dim, in_chans)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, h, w):
        """Position embeddings for an h x w patch grid, bicubic from the trained (square) grid."""
        n = self.pos_embed.shape[1] - 1
        if h * w == n and h == w:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = int(math.sqrt(n))
        patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, side, side)
        # scale_factor (new + 0.1) / old as the official code: the +0.1 guards the output size against
        # float rounding, and the factor (not the size) sets the sampling positions, so features match.
        scale = ((h + 0.1) / side, (w + 0.1) / side)
        patch_pos = F.interpolate(patch_pos.float(), scale_factor=scale, mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)  # (1, N, D)
        return torch.cat([cls_pos, patch_pos], dim=1)  # (1, 1+N, D)

    def prepare_tokens(self, x, stride=None):
        """CLS token + patch embeddings + position embeddings, (B, 1+N, D). stride (a divisor of the patch size,
        default the patch size): patches taken every `stride` pixels, an (H - p) / s + 1 grid (dense.py)."""
        B, _, H, W = x.shape
        p, s = self.patch_size, stride or self.patch_size
        if p % s or min(H, W) < p or (s == p and (H % p or W % p)):
            raise ValueError(f"input size {H}x{W} does not fit patches of {p} px taken every {s} px (a stride that "
                             f"divides the patch size; without overlap, sides that are multiples of it)")
        x = self.patch_embed(x, s)  # (B, N, D); with overlap, pixels past the last whole patch are left out
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1+N, D)
        return x + self.interpolate_pos_encoding((H - p) // s + 1, (W - p) // s + 1)

    def forward(self, x):
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]  # CLS token after the final norm, (B, D)

    def get_last_selfattention(self, x):
        """Attention weights of the last block, (B, H, 1+N, 1+N); row 0 is the CLS query (paper Fig. 1)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1](x, return_attention=True)

    def get_intermediate_layers(self, x, n=1):
        """Outputs of the last n blocks, each through the final norm, (B, 1+N, D) each."""
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x))
        return out


def vit_tiny(patch_size=16, **kw):
    return VisionTransformer(patch_size, **{"embed_dim": 192, "depth": 12, "num_heads": 3, **kw})


def vit_small(patch_size=16, **kw):
    return VisionTransformer(patch_size, **{"embed_dim": 384, "depth": 12, "num_heads": 6, **kw})


def vit_base(patch_size=16, **kw):
    return VisionTransformer(patch_size, **{"embed_dim": 768, "depth": 12, "num_heads": 12, **kw})


ARCHS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}  # the architectures by name
