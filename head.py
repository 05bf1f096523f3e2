"""Projection head and multi-crop wrapper (paper Sec. 3.1, Fig. 2 and Appendix "Projection head").

The head is a 3-layer MLP (hidden 2048, GELU) to a 256-d bottleneck, L2 normalization, then a
weight-normalized linear layer to K = out_dim. With norm_last_layer the magnitude of each output row is
fixed at 1: more stable, says the official code, which sets it false for vit_small (better) and true for vit_base.

Shape letters: B images, V crops, D backbone width, K out_dim.
"""
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightNormLinear(nn.Module):
    """Linear layer without bias, weight = g * v / ||v|| row-wise (Salimans & Kingma 2016).

    Parameter names weight_g (K, 1) and weight_v (K, in) are those of the official checkpoints.
    """

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default init, as the official
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x):
        weight = self.weight_g * F.normalize(self.weight_v, dim=1)  # (K, in), each row of norm g
        return F.linear(x, weight)


class DINOHead(nn.Module):
    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers += [nn.BatchNorm1d(dims[i + 1])] if use_bn else []
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)  # keys mlp.0/2/4 without BN, as the official
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad = not norm_last_layer

    def forward(self, x):
        x = self.mlp(x)  # (B, bottleneck)
        x = F.normalize(x, dim=-1)  # onto the unit sphere
        return self.last_layer(x)  # (B, K)


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per crop resolution and the head once over all crops.

    forward takes a list of crop batches [(B, 3, S_v, S_v)] and returns (sum of batch sizes, K) in the
    same order. Consecutive crops of the same size are concatenated into one backbone pass.
    """

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops):
        if torch.is_tensor(crops):
            crops = [crops]
        feats = [self.backbone(torch.cat(list(same_size)))  # (B * n, D) for n consecutive crops of one size
                 for _, same_size in itertools.groupby(crops, key=lambda crop: crop.shape[-2:])]
        return self.head(torch.cat(feats))  # (B * V, K)
