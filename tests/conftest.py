"""What the test files share: the repository root on sys.path (the tests import vit, train, ... as the scripts
do), one tiny configuration, and the tiny models, checkpoints and loader batches built from it.

    from conftest import TINY_TRAIN, tiny_vit, write_checkpoint, random_batch
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # tiny tensors: a thread pool only adds overhead (tests ran 2x slower on 2 busy cores)

import vit  # noqa: E402  (after the path is set)
from augment import DataAugmentationDINO  # noqa: E402


def pytest_configure(config):
    """A DeprecationWarning is an error in every test: an API on its way out fails here before it breaks."""
    config.addinivalue_line("filterwarnings", "error::DeprecationWarning")

# train.py on 28 px Fashion-MNIST with a 1-block ViT: a step takes milliseconds. Crop sizes are given, so the
# flags also fit an image folder (which has no preset). Test files add what their claim needs.
TINY_TRAIN = ["--data_path", "fashion_mnist", "--arch", "vit_tiny", "--depth", "1", "--patch_size", "7",
              "--global_crop_size", "28", "--local_crop_size", "14", "--local_crops_number", "2", "--out_dim", "64",
              "--num_workers", "0", "--warmup_epochs", "0", "--device", "cpu"]


def tiny_vit(patch_size=4, depth=2, seed=None, **kw):
    """A vit_tiny of `depth` blocks in eval mode (random init; seeded when seed is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    return vit.vit_tiny(patch_size=patch_size, depth=depth, **kw).eval()


def random_batch(args, batch=4, seed=0):
    """A batch as training_data.training_loader gives it: V uint8 crop batches and (B, V, P) photometric draws."""
    g = torch.Generator().manual_seed(seed)
    aug = DataAugmentationDINO(local_crops_number=args.local_crops_number, global_crop_size=args.global_crop_size,
                               local_crop_size=args.local_crop_size)
    sizes = [args.global_crop_size] * 2 + [args.local_crop_size] * args.local_crops_number
    crops = [torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, generator=g) for s in sizes]
    return crops, torch.stack([aug.draw_params(g) for _ in range(batch)])


def write_checkpoint(path, model=None, **args):
    """A checkpoint in train.py's layout (teacher `backbone.*`, plain-dict args) holding `model` (default: a
    tiny_vit of seed 0); args: the training args saved with it (arch, patch_size, depth are filled in)."""
    model = model if model is not None else tiny_vit(seed=0)
    args = {"arch": "vit_tiny", "patch_size": model.patch_size, "depth": len(model.blocks), **args}
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}, "args": args}, path)
    return str(path)


def load(out, name="checkpoint.pth"):
    """The checkpoint train.py wrote in folder `out`."""
    return torch.load(Path(out) / name, map_location="cpu", weights_only=True)


def relative_difference(a, b):
    return ((a - b).norm() / b.norm()).item() if b.norm() > 0 else (a - b).norm().item()


def no_key_bias(name, value):
    """qkv.bias without its key part: the key bias has a zero gradient in exact arithmetic (softmax ignores a
    constant added to all of a query's logits), so its updates are AdamW steps on rounding noise. It is compared
    only within the whole state dict, where it weighs nothing."""
    if name.endswith("attn.qkv.bias"):
        q, k, v = value.chunk(3)
        return torch.cat([q, v])
    return value
