"""Retrieval with frozen features (paper Sec. 4.2.1): descriptors, GeM pooling, PCA whitening, average precision.

Shared by eval_image_retrieval.py (revisited Oxford/Paris, class retrieval) and eval_copy_detection.py (Copydays):
- descriptors of uint8 images: the CLS token, optionally averaged over scales 1, 1/sqrt(2), 1/2 (retrieval);
  the CLS token concatenated with GeM (p = 4) of the last block's patch tokens (copy detection); raw pixels;
- PCA whitening learned on a separate set of images (the official operator, or from the centered covariance);
- average precision as the revisited Oxford/Paris evaluation computes it (trapezoids over the precision-recall
  curve, junk images removed from the ranking), mean precision at k, and class-retrieval mAP in chunks.

Shape letters: B images, N patches (database size in rankings), D feature width, Q queries.
"""
import json

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import backbone
import data
from cli import bool_flag, nonneg_int, positive_int

SCALES = (1.0, 2 ** -0.5, 0.5)  # the official multi-scale evaluation


# --- descriptors ------------------------------------------------------------------------------------------------
def gem(x, p=4.0, eps=1e-6):
    """Generalized mean pooling over dim 1 (Radenovic et al. 2018): (B, N, D) -> (B, D).

    GeM(x) = (1/N sum_n max(x_n, eps)^p)^(1/p): the mean at p = 1, the maximum as p -> infinity.
    """
    return x.clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


def crop_to_patches(images, patch_size):
    """Drop the last rows and columns beyond a multiple of the patch size, as the official stride-p patch
    convolution ignores them (our ViT refuses such sizes instead)."""
    h, w = images.shape[-2] // patch_size * patch_size, images.shape[-1] // patch_size * patch_size
    if h == 0 or w == 0:
        raise ValueError(f"image {tuple(images.shape[-2:])} is smaller than one patch ({patch_size} px)")
    return images[..., :h, :w]


def cls_descriptor(model, multiscale=False):
    """uint8 images (B, 3, H, W) -> CLS features (B, D); with multiscale, the mean of the CLS features at
    scales 1, 1/sqrt(2) and 1/2 (bilinear resize), L2-normalized per image."""
    def describe(images):
        x = data.normalize(images)
        if not multiscale:
            return model(crop_to_patches(x, model.patch_size))
        feats = 0
        for s in SCALES:
            xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            feats = feats + model(crop_to_patches(xs, model.patch_size))
        # NOTE: the official multi_scale divides by the norm of the whole batch (it runs with batch 1); per image here
        return F.normalize(feats / len(SCALES), dim=-1)
    return describe


def cls_gem_descriptor(model, p=4.0):
    """uint8 images (B, 3, H, W) -> [CLS, GeM_p(patch tokens)] of the last block after the final norm, (B, 2D):
    the official copy-detection descriptor."""
    def describe(images):
        tokens = model.get_intermediate_layers(crop_to_patches(data.normalize(images), model.patch_size))[0]
        return torch.cat([tokens[:, 0], gem(tokens[:, 1:], p)], dim=1)  # (B, 1+N, D) -> (B, 2D)
    return describe


def pixel_descriptor(images):
    """The baseline: raw pixels in [0, 1], flattened, (B, 3 H W)."""
    return images.float().flatten(1) / 255


@torch.no_grad()
def global_descriptors(describe, dataset, device, batch_size=256, num_workers=0, desc="features"):
    """describe(uint8 images on device) for every item (uint8 image (3, H, W), label) of `dataset`, with a progress
    bar: features (N, D) float32 on `device` and the labels (N,). Images of different sizes need batch_size 1."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    feats, labels = [], []
    for images, targets in tqdm(loader, desc=desc, leave=False):
        # NOTE: bf16 autocast on a GPU (the official extracts in fp32), and one process (no torch.distributed)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats.append(describe(images.to(device)).float())
        labels.append(torch.as_tensor(targets))
    return torch.cat(feats), torch.cat(labels)


# --- whitening --------------------------------------------------------------------------------------------------
WHITENINGS = ("official", "centered")  # the D x D matrix whose eigenvectors whiten, see Whitening


class Whitening:
    """PCA whitening learned on features X (M, D) of a separate set: x -> (x - mean) V diag(eigval^-1/2), mean the
    learning set's mean and (eigval, V) the eigenpairs of a D x D matrix of the learning set, columns by decreasing
    eigenvalue, all D kept; eigenvalues below eps * the largest are raised to it (as the official `PCA`).

    mode "official", as the official eval_copy_detection.py: the matrix is the second moment of the *uncentered*
    features, X^T X / M (the mean is subtracted from the queries and the database only); mode "centered": the
    covariance (X - mean)^T (X - mean) / M, which makes the learning set's covariance the identity.
    """

    def __init__(self, feats, mode="official", eps=1e-5):
        if mode not in WHITENINGS:
            raise ValueError(f"whitening {mode!r} is not one of {WHITENINGS}")
        x = feats.double()
        self.mean = x.mean(dim=0)
        if mode == "centered":
            x = x - self.mean
        # NOTE: float64 and an eigenvalue floor of 1e-12; the official works in float32 (and divides by zero at 0)
        moment = x.T @ x / len(x)  # (D, D)
        eigval, eigvec = torch.linalg.eigh(moment)  # ascending
        eigval = eigval.clamp(min=max(eigval.max().item() * eps, 1e-12))
        self.projection = (eigvec / eigval.sqrt()).flip(1)  # (D, D): columns by decreasing eigenvalue

    def __call__(self, x):
        return ((x.double() - self.mean.to(x.device)) @ self.projection.to(x.device)).float()


# --- average precision ----------------------------------------------------------------------------------------
def average_precision(hits, num_positives):
    """AP of each ranking: hits (Q, N) bool, hits[q, r] = the item ranked r (0-based, junk removed) is a positive;
    num_positives (Q,) counts the positives of each query (those not ranked count as never found).

    As the revisited Oxford/Paris evaluation (and Holidays/Copydays): trapezoids over the precision-recall curve.
    The i-th positive (i = 0, 1, ...) found at rank r adds (1 / num_positives) * (P_left + P_right) / 2 with
    P_left = i / r (1 when r = 0) and P_right = (i + 1) / (r + 1).
    """
    hits = hits.double()
    found = hits.cumsum(dim=1)  # (Q, N): positives up to and including rank r, = i + 1 at a positive
    rank = torch.arange(hits.shape[1], dtype=torch.float64, device=hits.device)
    p_right = found / (rank + 1)
    p_left = torch.where(rank == 0, 1.0, (found - 1) / rank.clamp(min=1))
    ap = (hits * (p_left + p_right) / 2).sum(dim=1)
    return ap / torch.as_tensor(num_positives, dtype=torch.float64, device=hits.device)


def precision_at(hits, kappas):
    """(Q, len(kappas)) mean-precision-at-k of the revisited evaluation: k is capped at the rank of the last positive
    found, kq = min(k, rank of last positive, 1-based), precision = positives in the top kq / kq, divided in float64
    as the official numpy code does."""
    found = hits.double().cumsum(dim=1)  # (Q, N)
    last = hits.shape[1] - hits.flip(1).long().argmax(dim=1)  # (Q,): 1-based rank of the last positive
    out = torch.zeros(len(hits), len(kappas), dtype=torch.float64)
    for j, k in enumerate(kappas):
        kq = last.clamp(max=k)
        out[:, j] = found.gather(1, (kq - 1)[:, None])[:, 0] / kq
    return out.where(hits.any(dim=1, keepdim=True), torch.zeros(()))  # no positive found: 0


def compute_map(ranks, gnd, kappas=(1, 5, 10)):
    """The revisited Oxford/Paris evaluation, with the official signature: ranks (N, Q) numpy, column q the database
    indices by decreasing similarity to query q; gnd[q] = {"ok": positives, "junk": ignored images}. Junk images are
    taken out of the ranking (positives move up); a query without positives is left out of the means.
    Returns (mAP, APs (Q,), mean precision at kappas, precisions (Q, len(kappas))); NaN for the left-out queries."""
    aps, prs = np.full(len(gnd), np.nan), np.full((len(gnd), len(kappas)), np.nan)
    for q, g in enumerate(gnd):
        ok, junk = np.asarray(g["ok"]), np.asarray(g.get("junk", []))
        if len(ok) == 0:
            continue
        is_ok = np.isin(ranks[:, q], ok)
        # NOTE: an image both positive and junk stays in the ranking as a positive; the official also counts it as junk
        # for the later positives (one rank up each), which can rank two positives equal (AP > 1). The revisited
        # protocols never list an image in both.
        hits = torch.from_numpy(is_ok[~np.isin(ranks[:, q], junk) | is_ok])[None]  # (1, N - junk)
        aps[q] = average_precision(hits, [len(ok)]).item()
        prs[q] = precision_at(hits, kappas)[0].numpy()
    return np.nanmean(aps), aps, np.nanmean(prs, axis=0), prs


@torch.no_grad()
def class_retrieval(query_feats, query_labels, db_feats, db_labels, kappas=(1, 5, 10), chunk=256):
    """Each query ranks the whole database by cosine similarity; its positives are the images of its class.
    Returns (mAP, mean precision at kappas (len(kappas),)), computed `chunk` queries at a time."""
    db = F.normalize(db_feats.float(), dim=1)  # (N, D)
    queries = F.normalize(query_feats.float(), dim=1)  # (Q, D)
    db_labels, query_labels = db_labels.to(db.device), query_labels.to(db.device)
    per_class = torch.bincount(db_labels, minlength=int(query_labels.max()) + 1)
    keep = per_class[query_labels] > 0  # as compute_map, a query whose class is not in the database is left out
    if not keep.any():
        raise ValueError("no query has a class present in the database")
    queries, query_labels = queries[keep], query_labels[keep]
    ap_sum, pr_sum = 0.0, torch.zeros(len(kappas), dtype=torch.float64)
    for start in tqdm(range(0, len(queries), chunk), desc="ranking", leave=False):
        q, labels = queries[start:start + chunk], query_labels[start:start + chunk]
        order = (q @ db.T).argsort(dim=1, descending=True)  # (b, N)
        hits = db_labels[order] == labels[:, None]  # (b, N)
        ap_sum += average_precision(hits, per_class[labels]).sum().item()
        pr_sum += precision_at(hits.cpu(), kappas).sum(dim=0)
    return ap_sum / len(queries), (pr_sum / len(queries)).numpy()


def rank_database(query_feats, db_feats, k=None):
    """Cosine similarities and indices of the database (N, D) by decreasing similarity to each query (Q, D):
    (Q, k) each, all N when k is None."""
    sim = F.normalize(query_feats.float(), dim=1) @ F.normalize(db_feats.float(), dim=1).T  # (Q, N)
    return sim.topk(min(k or sim.shape[1], sim.shape[1]), dim=1)


# --- what the scripts compare -----------------------------------------------------------------------------------
def compared_backbones(model, args):
    """[(name, ViT in eval mode)]: the backbone of the flags (backbone.from_args) and, with --baselines, the same
    architecture at random init (seed 0). The scripts add raw pixels as a third baseline."""
    if args.pretrained_weights == backbone.RANDOM:
        return [("random init", model)]
    models = [(f"DINO ({args.pretrained_weights})", model)]
    return models + ([("random init", backbone.random_like(model))] if args.baselines else [])


def add_evaluation_args(p, batch_size):
    """The flags both scripts take besides the backbone's (backbone.add_args): data, baselines, batching, output."""
    g = p.add_argument_group("evaluation")
    g.add_argument("--data_root", default="data", help="where named datasets are looked for and downloaded")
    g.add_argument("--baselines", type=bool_flag, default=False, help="also evaluate the architecture at random "
                   "init and, where all images have one size, raw pixels")
    g.add_argument("--batch_size", type=positive_int, default=batch_size)
    g.add_argument("--num_workers", type=nonneg_int, default=0)
    g.add_argument("--output_json", default=None, help="also write the results to this JSON file")
    return g


def report(title, results, args):
    """The results {features: {column: value}} as a markdown table on stdout (in percent), and as JSON in
    args.output_json when it is set."""
    columns = list(next(iter(results.values())))
    print(f"{title}\n| features | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for name, values in results.items():
        print(f"| {name} | " + " | ".join(f"{100 * values[c]:.2f}" for c in columns) + " |")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1, default=str)  # str: the device
