"""Linear probe: a linear classifier trained with labels on frozen DINO features (paper Sec. 3.2
"Evaluation protocols", Sec. 4.1, Appendix).

The feature, as the official eval_linear.py: ViT-S concatenates the CLS tokens of the last 4 blocks
(--n_last_blocks 4, the default); ViT-B takes the last CLS token and the average of the last block's patch
tokens (--n_last_blocks 1 --avgpool_patchtokens true). Each block output goes through the final norm.
The classifier: a linear layer initialized N(0, 0.01) with zero bias, SGD with momentum 0.9 and no weight
decay, lr 0.001 x batch / 256 on a cosine schedule to 0 over the epochs, trained on RandomResizedCrop + flip.
--precomputed_features (the default for fashion_mnist, cifar10, cifar100) computes the features of the
evaluation view once and trains on them without augmentation: the same probe in seconds instead of hours.

    python eval_linear.py                   # output/checkpoint.pth on Fashion-MNIST, features computed once
    python eval_linear.py --pretrained_weights dino_deitsmall16_pretrain.pth --arch vit_small --patch_size 16 \
        --data_path /data/imagenet            # the paper's protocol

Shape letters: B images, N patches, D backbone width, F = D * (n_last_blocks + avgpool) feature width, C classes.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2
from tqdm import tqdm

import backbone
import cli
import data
from backbone import ProbeFeatures  # the protocol's frozen feature, shared with extract_features.py

PRECOMPUTED_BY_DEFAULT = ("fashion_mnist", "cifar10", "cifar100")


def linear_layer(dim, num_classes):
    layer = nn.Linear(dim, num_classes)
    nn.init.normal_(layer.weight, mean=0.0, std=0.01)
    nn.init.zeros_(layer.bias)
    return layer


class Augmented(torch.utils.data.Dataset):
    """Training view of the protocol: RandomResizedCrop(size) (scale 0.08-1) and a horizontal flip, uint8 out."""

    def __init__(self, dataset, size):
        self.dataset = dataset
        self.transform = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return self.transform(data.to_rgb(image)).contiguous(), label


def accuracy(classifier, feats, labels):
    """(top-1, top-5) in percent; top-5 is over all classes when there are fewer than 5."""
    with torch.no_grad():
        ranked = classifier(feats).topk(min(5, classifier.out_features), dim=1).indices  # (M, <=5)
    hits = ranked == labels[:, None]
    return 100.0 * hits[:, 0].float().mean().item(), 100.0 * hits.any(dim=1).float().mean().item()


def linear_probe(features, train_set, test_set, num_classes, size, device, epochs=100, lr=0.001, batch_size=1024,
                 precomputed=True, num_workers=0):
    """Trains a linear classifier on `features` (a ProbeFeatures) of train_set; returns its (top-1, top-5) on
    test_set. Test features are always those of the deterministic evaluation view (data.EvalTransform)."""
    extract = lambda ds, desc: data.extract_features(features, ds, size, device, batch_size, num_workers, desc=desc)
    test_feats, test_labels = extract(test_set, "test features")
    if precomputed:
        train_feats, train_labels = extract(train_set, "train features")

        def batches(epoch):
            for idx in torch.randperm(len(train_feats), device=device).split(batch_size):
                yield train_feats[idx], train_labels[idx]
    else:
        loader = torch.utils.data.DataLoader(Augmented(train_set, size), batch_size, shuffle=True,
                                             num_workers=num_workers, pin_memory=device.type == "cuda")

        def batches(epoch):
            for images, labels in tqdm(loader, desc=f"epoch {epoch}", leave=False):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    feats = features(data.normalize(images.to(device, non_blocking=True))).float()
                yield feats, labels.to(device)

    classifier = linear_layer(features.dim, num_classes).to(device)
    # linear scaling rule; the official code runs 8 GPUs x 128 = 1024 images a step
    optimizer = torch.optim.SGD(classifier.parameters(), lr * batch_size / 256, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)  # stepped per epoch
    for epoch in (bar := tqdm(range(epochs), desc="linear probe")):
        for feats, labels in batches(epoch):
            loss = F.cross_entropy(classifier(feats), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    # NOTE: the accuracy after the last epoch; the official script reports the best epoch's test accuracy
    return accuracy(classifier, test_feats, test_labels)


def get_args_parser():
    p = cli.ArgumentParser(description="Linear probe on frozen DINO features (paper Sec. 4.1)")
    backbone.add_args(p)
    p.add_argument("--n_last_blocks", type=cli.positive_int, default=4,
                   help="concatenate the CLS tokens of the last n blocks (official code: 4 for ViT-S, 1 for ViT-B)")
    p.add_argument("--avgpool_patchtokens", type=cli.bool_flag, default=False,
                   help="also the average of the last block's patch tokens (official code: false for ViT-S, true "
                   "for ViT-B)")
    p.add_argument("--epochs", type=cli.positive_int, default=100)
    p.add_argument("--lr", type=cli.positive_float, default=0.001,
                   help="for a batch of 256, scaled linearly with --batch_size")
    p.add_argument("--batch_size", type=cli.positive_int, default=1024, help="official: 128 per GPU on 8 GPUs")
    p.add_argument("--precomputed_features", type=cli.bool_flag, default=None, help="features computed once, no "
                   "augmentation (default: true for fashion_mnist, cifar10, cifar100, else false)")
    p.add_argument("--data_path", default="fashion_mnist", help="dataset name or ImageFolder path (train/, val/)")
    p.add_argument("--data_root", default="data")
    p.add_argument("--image_size", type=cli.positive_int, default=None,
                   help="crop size (default: the checkpoint's global crop size, else the dataset's)")
    p.add_argument("--subset", type=cli.nonneg_int, default=0, help="use only the first N images of each split")
    p.add_argument("--num_workers", type=cli.nonneg_int, default=min(4, os.cpu_count() or 1))
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    model, saved = backbone.from_args(args)
    features = ProbeFeatures(model, args.n_last_blocks, args.avgpool_patchtokens)
    datasets = data.build_datasets(args.data_path, args.data_root, args.subset)
    if datasets.labelled_test is None:
        raise cli.ConfigError(f"{args.data_path} has no labelled test split: the probe needs train/ and val/")
    train_set, test_set = datasets.labelled_train, datasets.labelled_test
    precomputed = args.precomputed_features
    if precomputed is None:
        precomputed = args.data_path in PRECOMPUTED_BY_DEFAULT
    size = backbone.eval_size(args.image_size, saved, datasets.image_size, getattr(model, "patch_size", None))
    print(f"linear probe on {features.dim}-d features ({args.n_last_blocks} CLS tokens"
          f"{' + pooled patches' if args.avgpool_patchtokens else ''}) of {len(train_set)} {args.data_path} images, "
          f"{'precomputed features' if precomputed else 'RandomResizedCrop + flip'}, {args.epochs} epochs")
    top1, top5 = linear_probe(features, train_set, test_set, datasets.num_classes, size, args.device, args.epochs,
                              args.lr, args.batch_size, precomputed, args.num_workers)
    print(f"Linear probe on {len(test_set)} test images: top-1 = {top1:.2f}, top-5 = {top5:.2f}")


if __name__ == "__main__":
    cli.run_cli(main)
