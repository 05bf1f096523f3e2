"""Dense DINO features as visual descriptors (Amir, Gandelsman, Bagon, Dekel, "Deep ViT Features as Dense Visual
Descriptors", 2021; reference code github.com/ShirAmir/dino-vit-features).

A frozen DINO ViT, no training: the keys (or queries, values, tokens) of one block, one per patch, describe the
image densely (their Sec. 3). This file holds the parts the applications share:
  descriptors()     descriptors of a layer and facet, with the patch stride lowered (overlapping patches, their
                    Sec. 3.1 "Increasing spatial resolution"), optional log-binning (their Sec. 3.1 "Log-binning"),
                    and the saliency maps of the last layer's CLS attention (their Sec. 4.1); image_descriptors(): one image
  kmeans(), elbow_kmeans()   k-means on the unit sphere, with restarts and the elbow rule for k
  cosegment(), part_cosegment()   their Sec. 4.1 and 4.2: clusters voted salient, then parts of the foreground
  best_buddies(), correspondences()   their Sec. 4.3: mutual nearest neighbours, N diverse pairs
  patch_centers(), patches_to_pixels()   where the patches of a grid lie in the image
  settings_error()   what is wrong with a layer and stride for a model (None when nothing is)
The scripts cosegment.py, correspond.py, pca.py and similarity.py hold the command lines: they read images, run
these and draw. Their descriptor flags (--layer, --facet, --stride, --bin) are backbone.add_descriptor_args() and
backbone.resolve_descriptor_args().

Shape letters: B images, N patches (h x w grid), D descriptor width, H heads, M descriptors, K clusters,
p patch size, s stride.
"""
import torch
import torch.nn.functional as F

FACETS = ("key", "query", "value", "token")
# NOTE: the reference averages heads 0, 2, 4, 5 of the official ViT-S/8 for its saliency maps, and has no
# choice for other models; we use these for a 6-head ViT with patch 8 and all heads otherwise.
VITS8_SALIENCY_HEADS = (0, 2, 4, 5)


def grid_size(height, width, patch_size, stride):
    """Patches along each side when p x p patches are taken every s pixels: (H - p) // s + 1."""
    return (height - patch_size) // stride + 1, (width - patch_size) // stride + 1


def facet_of_block(block, x, facet):
    """One block's facet for the tokens x (B, 1+N, D) entering it: its output ('token', no final norm), or the
    key / query / value of its attention (of the normed input), heads ordered as the reference: (B, 1+N, D)."""
    if facet == "token":
        return block(x)
    B, T, D = x.shape
    heads = block.attn.num_heads
    qkv = block.attn.qkv(block.norm1(x)).reshape(B, T, 3, heads, D // heads)  # (B, 1+N, 3, H, D/H)
    out = qkv[:, :, ("query", "key", "value").index(facet)]  # (B, 1+N, H, D/H)
    # NOTE: channel j * H + head, not head * D/H + j: the reference flattens (B, T, D/H, H). Same numbers,
    # interleaved; distances and clusters do not depend on the order.
    return out.transpose(-1, -2).reshape(B, T, D)  # (B, 1+N, D/H, H) -> (B, 1+N, D)


def log_bin(desc, grid, hierarchy=2):
    """Log-binned descriptors (B, N, (1 + 8 hierarchy) D) from descriptors (B, N, D) on an (h, w) grid.

    Level k averages the descriptors over 3^k x 3^k windows and takes the averages centred 3^k patches away in
    the 8 directions (and, for k = 0, the patch itself): with hierarchy 2, 9 single descriptors of the 3 x 3
    neighbourhood, then 8 averages of 3 x 3 windows covering the 9 x 9 neighbourhood, 17 bins in all.
    Windows are averaged over the patches inside the grid; a bin centred outside the grid takes the nearest
    one inside (the reference's border rule), here by replicate padding instead of a loop over the patches.
    """
    B, N, D = desc.shape
    h, w = grid
    x = desc.transpose(1, 2).reshape(B, D, h, w)  # (B, D, h, w)
    bins = []
    for k in range(hierarchy):
        size = 3 ** k
        pooled = F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=False)  # (B, D, h, w)
        padded = F.pad(pooled, (size, size, size, size), mode="replicate")  # (B, D, h + 2 size, w + 2 size)
        for dy in (-size, 0, size):
            for dx in (-size, 0, size):
                if k > 0 and dy == dx == 0:
                    continue  # the centre window of level k > 0 is covered by the finer levels
                bins.append(padded[:, :, size + dy:size + dy + h, size + dx:size + dx + w])
    return torch.cat(bins, dim=1).flatten(2).transpose(1, 2)  # (B, 17 D, h, w) -> (B, N, 17 D)


def saliency_heads(model):
    """The heads whose CLS attention the saliency maps average (see VITS8_SALIENCY_HEADS)."""
    if model.num_heads == 6 and model.patch_size == 8:
        return list(VITS8_SALIENCY_HEADS)
    return list(range(model.num_heads))


def settings_error(model, layer, stride):
    """What is wrong with descriptors of block `layer` (from 0) at `stride` for this model, or None: a message
    that begins with the name of the wrong argument."""
    if model.patch_size % stride:
        return f"stride {stride} does not divide the patch size {model.patch_size}"
    if not 0 <= layer < len(model.blocks):
        return f"layer {layer} is not a block of this model: it has blocks 0..{len(model.blocks) - 1}"
    return None


@torch.no_grad()
def descriptors(model, images, layer=11, facet="key", stride=None, bin=False, saliency=False, include_cls=False):
    """Descriptors of normalized images (B, 3, H, W): (descriptors (B, N, D'), saliency (B, N) or None, (h, w)).

    layer: block index from 0; facet: key, query, value (heads concatenated) or token (the block's output);
    stride: divides the patch size (default: the patch size), patches taken every `stride` pixels
    (model.prepare_tokens: the patch convolution run with that stride, position embeddings interpolated for
    the grid_size() grid, as the reference but for the NOTE below); bin: log_bin(); saliency: the last block's
    CLS attention, averaged over saliency_heads(), min-max normalized per image to [0, 1] (reference
    `extract_saliency_maps`).
    include_cls keeps the CLS descriptor first (B, 1+N, D), without binning.
    """
    if facet not in FACETS:
        raise ValueError(f"facet {facet!r} is not one of {FACETS}")
    p, s = model.patch_size, stride or model.patch_size
    if problem := settings_error(model, layer, s):
        raise ValueError(problem)
    if min(images.shape[-2:]) < p:
        raise ValueError(f"images of {tuple(images.shape[-2:])} px are smaller than one {p} px patch")
    grid = grid_size(*images.shape[-2:], p, s)
    # Only the pixels whole patches cover: the convolution reads no others, and at stride p vit.prepare_tokens
    # asks for sides that are multiples of p.
    # NOTE: position embeddings. vit.py keeps the trained t x t ones (t = 28 for the official ViT-S/8, 14 for /16)
    # whenever the grid is t x t, the reference only when also H == W. They differ only for a non-square image
    # whose grid is t x t: both sides in [p + (t - 1) s, p + t s - 1] (224..231 px at stride 8,
    # 116..119 px at stride 4 for ViT-S/8), where the reference re-interpolates them by the factor (t + 0.1) / t.
    # Never for a square image, nor for a grid that is not t x t (at the reference's 224 px and stride 4: 55 x w).
    x = model.prepare_tokens(images[..., :(grid[0] - 1) * s + p, :(grid[1] - 1) * s + p], s)  # (B, 1+N, D)
    last = len(model.blocks) - 1 if saliency else layer
    desc = sal = None
    for i, block in enumerate(model.blocks[:last + 1]):
        if i == layer:
            desc = facet_of_block(block, x, facet)  # (B, 1+N, D)
        if i == len(model.blocks) - 1 and saliency:
            attn = block(x, return_attention=True)  # (B, H, 1+N, 1+N)
            cls = attn[:, saliency_heads(model), 0, 1:].mean(dim=1)  # (B, N): CLS query, patch keys
            lo, hi = cls.amin(dim=1, keepdim=True), cls.amax(dim=1, keepdim=True)
            sal = (cls - lo) / (hi - lo)
        if i < last:
            x = desc if (i == layer and facet == "token") else block(x)
    if not include_cls:
        desc = desc[:, 1:]  # (B, N, D)
    elif bin:
        raise ValueError("include_cls and bin cannot be used together (as in the reference)")
    return (log_bin(desc, grid) if bin else desc), sal, grid


def image_descriptors(model, image, layer, facet="key", stride=None, bin=False):
    """(descriptors (N, D'), saliency (N,), (h, w)) of one normalized image (3, H, W): descriptors() of it."""
    desc, sal, grid = descriptors(model, image[None], layer, facet, stride, bin, saliency=True)
    return desc[0], sal[0], grid


# --- k-means --------------------------------------------------------------------------------------------
def sq_distances(x, centroids):
    """Squared Euclidean distances (..., M, K) between x (M, D) and centroids (..., K, D): |x|^2 - 2 x.c + |c|^2."""
    return ((x * x).sum(-1)[:, None] - 2 * x @ centroids.transpose(-1, -2)
            + (centroids * centroids).sum(-1)[..., None, :]).clamp_min(0)


def kmeans(x, k, iters=300, restarts=10, seed=0):
    """Lloyd's k-means of x (M, D) from `restarts` random draws of k points, all restarts run together; the one
    with the smallest sum of squared distances wins. Returns (centroids (K, D), labels (M,)).

    NOTE: the reference uses faiss (co-segmentation: random init, 300 iterations, 10 restarts, as here) and
    sklearn (correspondences: k-means++ init); the clusters are those of a different random draw.
    """
    M, D = x.shape
    if not 1 <= k <= M:
        raise ValueError(f"k-means with k={k} needs 1 <= k <= {M} (the number of points)")
    g = torch.Generator().manual_seed(seed)
    init = torch.stack([torch.randperm(M, generator=g)[:k] for _ in range(restarts)])  # (R, K)
    c = x[init.to(x.device)]  # (R, K, D)
    ones = x.new_ones(restarts, M)
    for _ in range(iters):
        labels = sq_distances(x, c).argmin(-1)  # (R, M)
        # centroid = mean of its points: sums and counts by scatter-add; an empty cluster keeps its centroid
        sums = x.new_zeros(restarts, k, D).scatter_add_(1, labels[..., None].expand(-1, -1, D),
                                                        x.expand(restarts, -1, -1))  # (R, K, D)
        counts = x.new_zeros(restarts, k).scatter_add_(1, labels, ones)[..., None]  # (R, K, 1)
        new = torch.where(counts > 0, sums / counts.clamp_min(1), c)
        if torch.equal(new, c):
            break
        c = new
    dist = sq_distances(x, c)  # (R, M, K)
    best = dist.amin(-1).sum(-1).argmin()
    return c[best], dist[best].argmin(-1)


def assign(x, centroids, chunk=65536):
    """Nearest centroid of each row of x (M, D): (labels (M,), squared distances (M,)), in chunks of rows."""
    out = [sq_distances(part, centroids).min(-1) for part in x.split(chunk)]
    return torch.cat([o.indices for o in out]), torch.cat([o.values for o in out])


def sample_rows(per_image, interval):
    """Every interval-th descriptor of each image (the reference's `sample_interval`), concatenated."""
    return torch.cat([d[::interval] for d in per_image])


def elbow_kmeans(per_image, elbow=0.975, max_k=14, sample_interval=100, seed=0):
    """k-means for k = 1, 2, ... on the sampled descriptors, each assigning all of them; stops at the first k
    whose mean squared distance is above `elbow` x that of k - 1 (or at max_k), and returns that k's
    (centroids (K, D), labels (M,)) for the concatenated unit-normalized descriptors.

    NOTE: as the reference, the returned k is the first one that gained too little, not the one before it.
    """
    x = F.normalize(torch.cat(per_image), dim=-1)
    sample = sample_rows([F.normalize(d, dim=-1) for d in per_image], sample_interval)
    previous = None
    for k in range(1, min(max_k, len(sample)) + 1):
        centroids, _ = kmeans(sample, k, seed=seed)
        labels, dist = assign(x, centroids)
        if previous is not None and dist.mean() > elbow * previous:
            break
        previous = dist.mean()
    return centroids, labels


# --- co-segmentation (their Sec. 4.1) and part co-segmentation (Sec. 4.2) -----------------------------------
def cosegment(descs, sals, elbow=0.975, thresh=0.065, votes_percentage=75, sample_interval=100, seed=0):
    """Common foreground of a set of images: lists of descriptors (N_i, D) and saliency maps (N_i,).

    All descriptors are clustered together (elbow_kmeans); image i votes for cluster c when the mean saliency of
    its patches in c is above thresh; clusters with at least votes_percentage % of the images' votes are the
    foreground. Returns (masks: list of bool (N_i,), centroids (K, D), salient: bool (K,)).
    """
    centroids, labels = elbow_kmeans(descs, elbow, sample_interval=sample_interval, seed=seed)
    labels = labels.split([len(d) for d in descs])
    k = len(centroids)
    votes = torch.zeros(k, device=centroids.device)
    for lab, sal in zip(labels, sals):
        total = torch.zeros(k, device=sal.device).index_add_(0, lab, sal.float())
        mean = total / torch.bincount(lab, minlength=k)  # NaN for a cluster absent from the image: no vote
        votes += (mean > thresh).float()
    salient = votes >= -(-len(descs) * votes_percentage // 100)  # ceil(B * percentage / 100)
    return [salient[lab] for lab in labels], centroids, salient


def part_cosegment(descs, sals, num_parts=4, elbow=0.975, thresh=0.065, votes_percentage=75, sample_interval=100,
                   seed=0):
    """Parts common to a set of images: the foreground of cosegment() clustered again into num_parts clusters;
    each patch takes the nearest part centroid, or the background (label num_parts) when a background centroid
    of the first clustering is nearer. Returns a list of long (N_i,) part maps.

    NOTE: the reference then smooths the parts with a dense CRF (pydensecrf) at pixel resolution; we leave it out.
    """
    masks, centroids, salient = cosegment(descs, sals, elbow, thresh, votes_percentage, sample_interval, seed)
    units = [F.normalize(d, dim=-1) for d in descs]
    foreground = [u[m] for u, m in zip(units, masks)]
    sample = sample_rows(foreground, sample_interval)
    if len(sample) < num_parts:
        raise ValueError(f"only {len(sample)} sampled foreground descriptors for {num_parts} parts: "
                         f"lower sample_interval or num_parts")
    parts, _ = kmeans(sample, num_parts, seed=seed)
    background = centroids[~salient]  # (K_bg, D)
    maps = []
    for u in units:
        to_bg = assign(u, background)[1] if len(background) else torch.full((len(u),), torch.inf, device=u.device)
        d = torch.cat([sq_distances(u, parts), to_bg[:, None]], dim=1)  # (N, P + 1)
        maps.append(d.argmin(dim=1))
    return maps


# --- correspondences (their Sec. 4.3) -------------------------------------------------------------------
def best_buddies(desc1, desc2):
    """Mutual nearest neighbours by cosine similarity of desc1 (N1, D) and desc2 (N2, D): indices (i, j) with
    j the nearest neighbour of i in desc2 and i the nearest neighbour of j in desc1."""
    sim = F.normalize(desc1, dim=-1) @ F.normalize(desc2, dim=-1).T  # (N1, N2)
    nn12, nn21 = sim.argmax(dim=1), sim.argmax(dim=0)
    i = torch.nonzero(nn21[nn12] == torch.arange(len(desc1), device=sim.device)).squeeze(1)
    return i, nn12[i]


def correspondences(desc1, desc2, sal1, sal2, num_pairs=10, thresh=0.05, seed=0):
    """Up to num_pairs corresponding patches (i, j) of two images: best buddies whose two patches are both
    salient (> thresh), clustered by k-means of their joined normalized descriptors into num_pairs groups; each
    group gives its pair of highest mean saliency. Also returns all the salient best buddies (i, j).

    NOTE: the reference keeps a buddy when patch i is salient and some salient patch of image 2 has i as its
    nearest neighbour; we ask that i's buddy j itself be salient, as its comment says.
    """
    i, j = best_buddies(desc1, desc2)
    keep = (sal1[i] > thresh) & (sal2[j] > thresh)
    i, j = i[keep], j[keep]
    if len(i) == 0:
        return (i, j), (i, j)
    joined = F.normalize(torch.cat([desc1[i], desc2[j]], dim=1), dim=1)  # (M, 2 D)
    _, labels = kmeans(joined, min(num_pairs, len(i)), seed=seed)
    rank = (sal1[i] + sal2[j]) / 2
    # within each cluster the highest rank (the lowest index among ties): sort by rank, then stably by cluster
    order = rank.argsort(descending=True, stable=True)
    order = order[labels[order].argsort(stable=True)]
    first = torch.ones_like(order, dtype=torch.bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    chosen = order[first]
    return (i[chosen], j[chosen]), (i, j)


def patch_centers(index, grid, patch_size, stride):
    """Pixel (y, x) of the centres of patches `index` (M,) of an (h, w) grid: (row s + p // 2, col s + p // 2)."""
    return torch.stack([index // grid[1], index % grid[1]], dim=-1) * stride + patch_size // 2  # (M, 2)


def patches_to_pixels(maps, grid, size, patch_size, stride):
    """Per-patch values (..., N) on an (h, w) grid -> (..., H, W): each pixel takes the patch whose centre is
    nearest. NOTE: the reference resizes the grid to the image (PIL nearest); with stride < patch size the
    patch centres do not span the whole image, and nearest-centre is where each patch really is."""
    rows = [((torch.arange(n) + 0.5 - patch_size / 2) / stride).round().long().clamp(0, g - 1)
            for n, g in zip(size, grid)]
    maps = maps.reshape(*maps.shape[:-1], *grid)  # (..., h, w)
    return maps[..., rows[0].to(maps.device), :][..., rows[1].to(maps.device)]
