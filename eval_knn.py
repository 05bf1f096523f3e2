"""Weighted k-NN classification on frozen features (paper Sec. 4.1; Wu et al. 2018).

Each test image votes with its k nearest training images (cosine similarity of L2-normalized features),
neighbour j weighing exp(sim_j / T); the class with the largest summed weight wins. Paper: k=20, T=0.07.

    python eval_knn.py                       # output/checkpoint.pth on Fashion-MNIST, the defaults
    python eval_knn.py --pretrained_weights random --arch vit_tiny --patch_size 7 --depth 4   # its baseline
    python eval_knn.py --raw_pixels                      # the same k-NN on the pixels themselves: the scale
    python eval_knn.py --pretrained_weights dino_deitsmall16_pretrain.pth --arch vit_small --patch_size 16 \
        --data_path /data/imagenet

Shape letters: N train images, M test images, D feature width, C classes.
"""
import os

import torch
import torch.nn.functional as F

import backbone
import cli
import data


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


def knn_top1(model, datasets, size, device, k=20, T=0.07):
    """Top-1 of the weighted k-NN (paper: k = 20, T = 0.07) on a backbone's CLS features of a data.Datasets:
    its test split against its train split. train.py's online k-NN."""
    was_training = model.training
    model.eval()
    bank = data.extract_features(model, datasets.labelled_train, size, device, desc="k-NN train")
    test = data.extract_features(model, datasets.labelled_test, size, device, desc="k-NN test")
    model.train(was_training)
    return knn_classifier(*bank, *test, k, T, datasets.num_classes)[0]


def knn_report(train, test, num_classes, ks=(10, 20, 100, 200), T=0.07):
    """{k: (top1, top5)} for each k, printed one line each."""
    results = {}
    for k in ks:
        results[k] = knn_classifier(*train, *test, k, T, num_classes)
        print(f"{k}-NN classifier result: top1 = {results[k][0]:.2f}, top5 = {results[k][1]:.2f}")
    return results


def main(argv=None):
    p = cli.ArgumentParser(description="k-NN evaluation of a DINO backbone (paper Sec. 4.1)")
    backbone.add_args(p)
    p.add_argument("--data_path", default="fashion_mnist", help="dataset name or ImageFolder path (train/, val/)")
    p.add_argument("--data_root", default="data")
    p.add_argument("--image_size", type=cli.positive_int, default=None,
                   help="eval crop size (default: the checkpoint's global crop size, else the dataset's)")
    p.add_argument("--nb_knn", type=cli.positive_int, nargs="+", default=[10, 20, 100, 200],
                   help="numbers of neighbours (paper: 20)")
    p.add_argument("--temperature", type=cli.positive_float, default=0.07, help="T of the vote weights exp(sim / T)")
    p.add_argument("--batch_size", type=cli.positive_int, default=256)
    p.add_argument("--subset", type=cli.nonneg_int, default=0, help="use only the first N images of each split")
    p.add_argument("--num_workers", type=cli.nonneg_int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--raw_pixels", action="store_true", help="no backbone: the normalized pixels of the evaluation "
                   "view are the features (the scale for a backbone's figure)")
    args = p.parse_args(argv)
    if args.raw_pixels:
        model, saved, args.device = torch.nn.Flatten(), {}, backbone.default_device(args.device)  # (B, 3 S S)
    else:
        model, saved = backbone.from_args(args)
    datasets = data.build_datasets(args.data_path, args.data_root, args.subset)
    if datasets.labelled_test is None:
        raise cli.ConfigError(f"{args.data_path} has no labelled test split: k-NN needs train/ and val/ folders")
    size = backbone.eval_size(args.image_size, saved, datasets.image_size, getattr(model, "patch_size", None))
    extract = lambda ds, desc: data.extract_features(model, ds, size, args.device, args.batch_size, args.num_workers,
                                                     desc=desc)
    knn_report(extract(datasets.labelled_train, "train features"), extract(datasets.labelled_test, "test features"),
               datasets.num_classes, args.nb_knn, args.temperature)


if __name__ == "__main__":
    cli.run_cli(main)
