"""Weighted k-NN classification on frozen features (paper Sec. 4.1; Wu et al. 2018).

Each test image votes with its k nearest training images (cosine similarity of L2-normalized features),
neighbour j weighing exp(sim_j / T); the class with the largest summed weight wins. Paper: k=20, T=0.07.

    python eval_knn.py --pretrained_weights output/checkpoint.pth --data_path fashion_mnist
    python eval_knn.py --pretrained_weights dino_deitsmall16_pretrain.pth --arch vit_small --patch_size 16 \
        --data_path /data/imagenet

Shape letters: N train images, M test images, D feature width, C classes.
"""
import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm


@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes, chunk=256):
    """Returns (top1, top5) accuracy in percent; any number of classes and of test images."""
    train_features = F.normalize(train_features.float(), dim=1)  # (N, D)
    test_features = F.normalize(test_features.float(), dim=1)  # (M, D)
    train_labels, test_labels = train_labels.to(train_features.device), test_labels.to(train_features.device)
    k = min(k, len(train_features))
    top1 = top5 = 0
    for start in range(0, len(test_features), chunk):
        feats, labels = test_features[start:start + chunk], test_labels[start:start + chunk]
        sim, idx = (feats @ train_features.T).topk(k, dim=1)  # (b, k) cosine similarities and neighbours
        neighbour_labels = train_labels[idx]  # (b, k)
        votes = torch.zeros(len(feats), num_classes, device=feats.device)
        votes.scatter_add_(1, neighbour_labels, (sim / T).exp())  # (b, C): sum of exp(sim / T) per class
        ranked = votes.topk(min(5, num_classes), dim=1).indices  # (b, <=5)
        hits = (ranked == labels[:, None]) & (votes.gather(1, ranked) > 0)  # a class with no vote is no guess
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
    return 100.0 * top1 / len(test_features), 100.0 * top5 / len(test_features)


class EvalTransform:
    """Deterministic view for evaluation: resize the short side to size * 256 / 224, center-crop `size`.

    Images already `size` pixels wide (Fashion-MNIST, CIFAR at their native size) are left as they are.
    Returns a uint8 (3, size, size) tensor; normalization happens on the device.
    """

    def __init__(self, size):
        self.size = size

    def __call__(self, image):
        image = TF.to_image(image)  # PIL or tensor -> uint8 (C, H, W)
        if image.shape[0] != 3:
            image = image[:1].expand(3, -1, -1) if image.shape[0] in (1, 2) else image[:3]
        if min(image.shape[-2:]) != self.size:
            image = TF.resize(image, self.size * 256 // 224, antialias=True)
        return TF.center_crop(image, self.size).contiguous()


class _Transformed(torch.utils.data.Dataset):
    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return self.transform(image), label


@torch.no_grad()
def extract_features(backbone, dataset, size, device, batch_size=256, num_workers=0, mean=None, std=None,
                     desc="features"):
    """CLS features (after the final norm) of every image, (N, D) on `device`, and labels (N,).

    Under torch.distributed each rank computes a strided shard and the shards are all-gathered.
    """
    from augment import IMAGENET_MEAN, IMAGENET_STD
    mean = torch.tensor(mean or IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std or IMAGENET_STD, device=device).view(1, 3, 1, 1)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    per_rank = -(-len(dataset) // world)
    indices = [min(i, len(dataset) - 1) for i in range(rank, per_rank * world, world)]  # pad the last shard
    shard = torch.utils.data.Subset(_Transformed(dataset, EvalTransform(size)), indices)
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    feats, labels = [], []
    for images, targets in tqdm(loader, desc=desc, disable=rank != 0, leave=False):
        images = (images.to(device, non_blocking=True).float() / 255 - mean) / std
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats.append(backbone(images).float())
        labels.append(torch.as_tensor(targets, device=device))
    feats, labels = torch.cat(feats), torch.cat(labels)
    if world > 1:
        feats = _gather_interleaved(feats, world)
        labels = _gather_interleaved(labels, world)
    return feats[:len(dataset)], labels[:len(dataset)]


def _gather_interleaved(x, world):
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.stack(parts, dim=1).flatten(0, 1)  # (per_rank, world, ...) -> dataset order


def knn_report(train, test, num_classes, ks=(10, 20, 100, 200), T=0.07):
    """{k: (top1, top5)} for each k, printed one line each."""
    results = {}
    for k in ks:
        results[k] = knn_classifier(*train, *test, k, T, num_classes)
        print(f"{k}-NN classifier result: top1 = {results[k][0]:.2f}, top5 = {results[k][1]:.2f}")
    return results


def main(argv=None):
    import train  # the dataset and model builders live with the training script
    p = argparse.ArgumentParser(description="k-NN evaluation of a DINO backbone (paper Sec. 4.1)")
    p.add_argument("--pretrained_weights", default="output/checkpoint.pth", help="our checkpoint (default: "
                   "output/checkpoint.pth), an official backbone file or an official *_full_checkpoint.pth")
    p.add_argument("--checkpoint_key", default="teacher", choices=["teacher", "student"])
    p.add_argument("--arch", default=None, choices=["vit_tiny", "vit_small", "vit_base"],
                   help="default: the checkpoint's, else vit_small (official backbone files hold no args)")
    p.add_argument("--patch_size", type=int, default=None, help="default: the checkpoint's, else 16")
    p.add_argument("--data_path", default="fashion_mnist", help="dataset name or ImageFolder path (train/, val/)")
    p.add_argument("--data_root", default="data")
    p.add_argument("--image_size", type=int, default=None,
                   help="eval crop size (default: the checkpoint's global crop size, else the dataset's)")
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    backbone, saved = train.load_backbone(args.pretrained_weights, args.arch, args.patch_size, args.checkpoint_key)
    backbone = backbone.to(device).eval()
    data = train.build_datasets(args.data_path, args.data_root)
    if data.knn_test is None:
        raise train.ConfigError(f"{args.data_path} has no labelled test split: k-NN needs train/ and val/ folders")
    size = args.image_size or saved.get("global_crop_size") or data.image_size
    extract = lambda ds, desc: extract_features(backbone, ds, size, device, args.batch_size, args.num_workers,
                                                desc=desc)
    knn_report(extract(data.knn_train, "train features"), extract(data.knn_test, "test features"),
               data.num_classes, T=args.temperature)


if __name__ == "__main__":
    from train import run_cli
    run_cli(main)
