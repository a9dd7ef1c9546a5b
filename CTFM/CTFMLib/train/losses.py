"""Contrastive loss of CT-FM pretraining: NT-Xent (SimCLR) restricted to one scan.

CT-FM's "intra-sample" SimCLR contrasts crops of the same scan only: the
positive of a crop's view is the other view of the same crop, its negatives
are every other view of every other crop of that scan. Crops of different
scans never meet, so the task is to tell places within one body apart, not
to tell patients (or scanners) apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ntxent_within_scan(z: torch.Tensor, n_crops: int, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent over the embeddings of each scan separately; mean over all anchors of all scans.

    ``z``: ``(S * 2 * n_crops, D)`` ordered ``[scan][view][crop]``, i.e. row
    ``s * 2n + v * n + c`` is view ``v`` of crop ``c`` of scan ``s``. For each
    anchor, logits are cosine similarities / ``temperature`` to the other
    ``2n - 1`` embeddings of its scan; the target is the other view of its crop.
    With all embeddings equal the loss is ``ln(2n - 1)``. Half-precision input
    is computed in float32; float64 stays float64.
    """
    if z.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {tuple(z.shape)}")
    if n_crops < 2:
        raise ValueError(f"n_crops must be at least 2 (a crop needs other crops as negatives), got {n_crops}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    group = 2 * n_crops
    if z.shape[0] == 0 or z.shape[0] % group:
        raise ValueError(f"{z.shape[0]} embeddings are not a whole number of scans of 2 x {n_crops} crop views")
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    n_scans = z.shape[0] // group
    # Outside autocast: similarities / 0.1 in bf16 would lose the small differences the loss is made of.
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = F.normalize(z, dim=1).reshape(n_scans, group, -1)
        logits = torch.bmm(z, z.transpose(1, 2)) / temperature  # (S, 2n, 2n)
        self_pair = torch.eye(group, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_pair, float("-inf"))  # an embedding is neither its own positive nor negative
        target = (torch.arange(group, device=z.device) + n_crops) % group
        return F.cross_entropy(logits.reshape(n_scans * group, group), target.repeat(n_scans))
