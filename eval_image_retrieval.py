"""Image retrieval with frozen DINO features (paper Sec. 4.2.1, Table 4): no fine-tuning, cosine ranking of CLS features.

Two protocols:
- `--dataset roxford5k` or `rparis6k`: revisited Oxford / Paris (Radenovic et al. 2018), laid out as the revisitop
  repository makes it: --data_path/<dataset>/gnd_<dataset>.pkl and --data_path/<dataset>/jpg/*.jpg. Every image is
  shrunk to at most --imsize pixels on its long side with PIL's Lanczos `thumbnail` (kept whole, batch 1); mAP
  and mean precision at 1, 5, 10 for the Medium protocol (easy and hard images are positives, junk ignored) and
  the Hard one (hard images are positives, easy and junk ignored).
- otherwise, class retrieval on --data_path (a dataset name or an ImageFolder with train/ and val/): each test
  image queries the training set, and its positives are the images of its class.

    python eval_image_retrieval.py --pretrained_weights output/checkpoint.pth --baselines true
    python eval_image_retrieval.py --pretrained_weights dino_deitsmall16_pretrain.pth --arch vit_small \
        --patch_size 16 --data_path /path/to/revisited_paris_oxford --dataset roxford5k --imsize 224
    python eval_image_retrieval.py --pretrained_weights dino_deitsmall16_pretrain.pth --arch vit_small \
        --patch_size 16 --data_path /path/to/revisited_paris_oxford --dataset rparis6k --imsize 512 --multiscale true

--baselines adds the same architecture at random init and (class retrieval only) raw pixels. Results: a table
on stdout and, with --output_json, a JSON file.

Shape letters: N database images, Q queries, D feature width.
"""
import os
import pickle

import numpy as np
import torch
import PIL.Image
from torchvision.transforms.v2 import functional as TF

import backbone
import data
from cli import ArgumentParser, ConfigError, bool_flag, positive_int, run_cli
from retrieval import (add_evaluation_args, class_retrieval, cls_descriptor, compared_backbones, compute_map,
                       global_descriptors, pixel_descriptor, report)

KAPPAS = (1, 5, 10)
NUMPY_ARRAYS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}


class _GroundTruthUnpickler(pickle.Unpickler):
    """The ground-truth files are pickles of dicts, lists, strings and numpy arrays: anything else is refused."""

    def find_class(self, module, name):
        if (module, name) not in NUMPY_ARRAYS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a ground-truth file")
        return super().find_class(module, name)


def load_ground_truth(path):
    """{imlist, qimlist, gnd} of gnd_roxford5k.pkl / gnd_rparis6k.pkl.

    NOTE: read with Python's pickle (they are not torch files, so torch.load(weights_only=True) cannot read them),
    through an unpickler that admits only numpy arrays besides plain Python values."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path} does not exist: --data_path must hold <dataset>/gnd_<dataset>.pkl and "
                          f"<dataset>/jpg/ (see https://github.com/filipradenovic/revisitop)")
    try:
        with open(path, "rb") as f:
            cfg = _GroundTruthUnpickler(f).load()
        cfg["imlist"], cfg["qimlist"], cfg["gnd"]  # noqa: B018 (the three entries the protocol needs)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path} is not a revisited Oxford/Paris ground-truth file ({type(e).__name__}: {e})")
    return cfg


def thumbnail(image, imsize):
    """uint8 (3, H, W) shrunk to fit in imsize x imsize with PIL's `Image.thumbnail` and its Lanczos filter, as the
    official script: the aspect ratio is kept, the short side rounded as PIL rounds it (to the size whose aspect
    ratio is nearest the image's: 1024 x 681 -> 512 x 341), and an image already small enough is left as it is."""
    pil = TF.to_pil_image(image)
    pil.thumbnail((imsize, imsize), PIL.Image.Resampling.LANCZOS)
    return TF.pil_to_tensor(pil)


class OxfordParisDataset(torch.utils.data.Dataset):
    """Items (uint8 (3, H, W) image shrunk by `thumbnail` to at most `imsize` on its long side, index) of the
    database (split "db") or of the queries (split "query"), whole images as the official code.

    NOTE: the revisited protocol crops each query to its bounding box; the official DINO code (and so this one)
    uses the whole query image."""

    def __init__(self, root, dataset, split, imsize):
        self.cfg = load_ground_truth(os.path.join(root, dataset, f"gnd_{dataset}.pkl"))
        self.names = self.cfg["qimlist"] if split == "query" else self.cfg["imlist"]
        self.folder, self.imsize = os.path.join(root, dataset, "jpg"), imsize

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        # NOTE: a truncated file is an error here; the official sets PIL's LOAD_TRUNCATED_IMAGES and uses what decodes
        image = data.read_image(os.path.join(self.folder, self.names[i] + ".jpg"))  # (3, H, W)
        return thumbnail(image, self.imsize), i


def revisited_protocols(gnd):
    """The Medium and Hard ground truths: {"medium": [...], "hard": [...]}, one {"ok", "junk"} per query."""
    cat = lambda g, keys: np.concatenate([np.asarray(g[k], dtype=np.int64).reshape(-1) for k in keys])
    return {"medium": [{"ok": cat(g, ["easy", "hard"]), "junk": cat(g, ["junk"])} for g in gnd],
            "hard": [{"ok": cat(g, ["hard"]), "junk": cat(g, ["junk", "easy"])} for g in gnd]}


def evaluate_revisited(describe, args, device):
    """{"mAP_medium", "mP@k_medium", ..., "mAP_hard", ...} for one descriptor on revisited Oxford or Paris."""
    db = OxfordParisDataset(args.data_path, args.dataset, "db", args.imsize)
    queries = OxfordParisDataset(args.data_path, args.dataset, "query", args.imsize)
    db_feats = global_descriptors(describe, db, device, 1, args.num_workers, desc="database features")[0]
    query_feats = global_descriptors(describe, queries, device, 1, args.num_workers, desc="query features")[0]
    sim = torch.nn.functional.normalize(db_feats, dim=1) @ torch.nn.functional.normalize(query_feats, dim=1).T
    ranks = sim.argsort(dim=0, descending=True).cpu().numpy()  # (N, Q): the official layout
    results = {}
    for protocol, gnd in revisited_protocols(db.cfg["gnd"]).items():
        mean_ap, _, mean_pr, _ = compute_map(ranks, gnd, KAPPAS)
        results[f"mAP_{protocol}"] = float(mean_ap)
        results |= {f"mP@{k}_{protocol}": float(p) for k, p in zip(KAPPAS, mean_pr)}
    return results


def evaluate_classes(describe, datasets, size, device, args):
    """{"mAP", "mP@1", "mP@5", "mP@10"}: test images query the training images; positives share the query's class."""
    view = lambda ds: data.Transformed(ds, data.EvalTransform(size))
    describe_all = lambda ds, desc: global_descriptors(describe, view(ds), device, args.batch_size, args.num_workers,
                                                       desc=desc)
    db_feats, db_labels = describe_all(datasets.labelled_train, "database features")
    query_feats, query_labels = describe_all(datasets.labelled_test, "query features")
    mean_ap, mean_pr = class_retrieval(query_feats, query_labels, db_feats, db_labels, KAPPAS)
    return {"mAP": float(mean_ap)} | {f"mP@{k}": float(p) for k, p in zip(KAPPAS, mean_pr)}


def get_args(argv=None):
    p = ArgumentParser(description="Image retrieval with frozen DINO features (paper Sec. 4.2.1)")
    p.add_argument("--data_path", default="fashion_mnist", help="the folder holding roxford5k/ and rparis6k/ "
                   "(with --dataset), else a dataset name or an ImageFolder with train/ and val/ (class retrieval)")
    p.add_argument("--dataset", default=None, choices=["roxford5k", "rparis6k"],
                   help="revisited Oxford or Paris; default: class retrieval on --data_path")
    p.add_argument("--imsize", type=positive_int, default=None, help="revisited Oxford/Paris: the long side "
                   "(default 224; the official README uses 224 for Oxford, 512 for Paris); class retrieval: the "
                   "evaluation crop, a multiple of the patch size (default: the checkpoint's global crop size, "
                   "else the dataset's image size)")
    p.add_argument("--multiscale", type=bool_flag, default=False,
                   help="average the CLS features at scales 1, 1/sqrt(2), 1/2 (the official --multiscale)")
    backbone.add_args(p)
    add_evaluation_args(p, batch_size=256)
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    model, saved = backbone.from_args(args, needs_vit="eval_image_retrieval.py")
    # NOTE: no default download; the official fetches the Google Landmarks v2 ViT-S/16 when given no weights
    device = args.device
    sources = [(name, cls_descriptor(m, args.multiscale)) for name, m in compared_backbones(model, args)]
    if args.dataset:
        args.imsize = args.imsize or 224
        evaluate = lambda describe: evaluate_revisited(describe, args, device)
    else:
        datasets = data.build_datasets(args.data_path, args.data_root)
        if datasets.labelled_test is None:
            raise ConfigError(f"{args.data_path} has no labelled test split: class retrieval needs train/ and val/")
        args.imsize = backbone.eval_size(args.imsize, saved, datasets.image_size, model.patch_size, "--imsize")
        sources += [("raw pixels", pixel_descriptor)] if args.baselines else []
        evaluate = lambda describe: evaluate_classes(describe, datasets, args.imsize, device, args)
    results = {name: evaluate(describe) for name, describe in sources}
    what = args.dataset or f"{args.data_path} class retrieval"
    report(f"{what}, {args.imsize} px{', multi-scale' if args.multiscale else ''}:", results, args)
    return results


if __name__ == "__main__":
    run_cli(main)
