"""The training data loader (paper Sec. 3.1, multi-crop): what each sample becomes, in which order, and what
happens to an unreadable file.

    loader, sampler = training_data.training_loader(dataset, args, rank, world_size, device)
    sampler.set_epoch(epoch, start)   # `start`: the samples of the epoch a resumed run has already done
    for crops, params, labels, errors in loader: ...

- `MultiCropDataset`: a sample's crops and photometric draws depend only on (seed, epoch, index), never on the rank,
  the batch or the DataLoader worker; an unreadable file is replaced by the next readable one.
- `EpochSampler`: one permutation per epoch, split over the ranks, skipping what a resumed run has done.
- `UnreadableImages`: the training loop's account of the unreadable files (a warning each, a limit per epoch).
"""
import itertools
import signal
import sys

import numpy as np
import torch
from tqdm import tqdm

from augment import DataAugmentationDINO
from cli import ConfigError


def training_loader(dataset, args, rank, world_size, device):
    """(loader, sampler): batches (crops, params, labels, errors) of this process. Each sample's crops and
    photometric draws depend only on (seed, epoch, index) (MultiCropDataset), never on the rank, the batch or the
    worker. `sampler.set_epoch(epoch, start)` chooses the epoch and how many of its samples to skip (resuming)."""
    step = args.batch_size_per_gpu * world_size * args.grad_accum_steps  # the images of one optimizer step
    if len(dataset) < step:
        raise ConfigError(f"{len(dataset)} images are fewer than one optimizer step of {step} (batch x processes x "
                          f"--grad_accum_steps): lower --batch_size_per_gpu or --grad_accum_steps")
    transform = DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                     args.global_crop_size, args.local_crop_size, args.blur_sigma)
    # One permutation per epoch (seed + epoch), rank r takes perm[r::world_size]: batch k of all ranks together is
    # perm[k B W : (k + 1) B W], batch k of one process with batch B W: the same samples for any world size W.
    sampler = EpochSampler(torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True,
                                                               seed=args.seed))
    # NOTE: its own generator keeps the DataLoader from drawing the workers' base seed from the global RNG at each
    # epoch (drop path draws from it): a resumed run then draws the same drop path masks as a straight one.
    loader = torch.utils.data.DataLoader(
        MultiCropDataset(dataset, transform, args.seed), sampler=sampler,
        batch_size=args.batch_size_per_gpu, num_workers=args.num_workers, pin_memory=device.type == "cuda",
        drop_last=True, persistent_workers=args.num_workers > 0, prefetch_factor=4 if args.num_workers > 0 else None,
        worker_init_fn=ignore_stop_signals, generator=torch.Generator())
    return loader, sampler


class MultiCropDataset(torch.utils.data.Dataset):
    """Wraps a dataset of (image, label); item (epoch, index) -> (crops, params, label, error), reproducibly.

    An image whose loading raises OSError (an empty, truncated or corrupt file) is replaced by the next readable
    one, cropped with the draws of (epoch, index); `error` is the message naming the file, "" when the image was
    read. Batches keep their size, runs stay reproducible, and the training loop counts and reports the messages."""
    def __init__(self, dataset, transform, seed=0):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, (tuple, list)) else (0, key)  # a plain index means epoch 0
        # NOTE: the official code draws from the workers' global RNGs; we seed one generator per sample.
        # SeedSequence mixes the three numbers, so neighbouring (epoch, index) get unrelated streams.
        seed = np.random.SeedSequence([self.seed, int(epoch), int(index)]).generate_state(1)[0]
        image, label, error = self.load(index)
        crops, params = self.transform(image, torch.Generator().manual_seed(int(seed)))
        return crops, params, label, error

    def load(self, index):
        """(image, label, "") or, when `index` cannot be read, the next readable index's image and label, and the
        error message."""
        # NOTE: the official code (torchvision's ImageFolder with PIL) stops at the first unreadable image.
        error = ""
        for k in range(len(self.dataset)):
            try:
                return *self.dataset[(index + k) % len(self.dataset)], error
            except OSError as e:
                error = error or str(e)
        raise OSError(f"no image of the dataset can be read; the first error: {error}")


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, index) for each index of an inner sampler (RandomSampler, DistributedSampler...).
    The epoch travels in the key because persistent workers never see attributes set in the main process."""
    def __init__(self, sampler):
        super().__init__()
        self.sampler, self.epoch, self.start = sampler, 0, 0

    def set_epoch(self, epoch, start=0):
        """start: skip the epoch's first `start` indices, those a run stopped in the middle of the epoch has done."""
        self.epoch, self.start = epoch, start
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch  # fixed when the iteration starts
        return ((epoch, int(index)) for index in itertools.islice(self.sampler, self.start, None))

    def __len__(self):
        return len(self.sampler) - self.start


class UnreadableImages:
    """The training loop's account of unreadable files. MultiCropDataset replaces such a file by the next readable
    one and passes on the message naming it; `count` warns once per file (per run) and stops training with a
    ConfigError when more than max_fraction of this process's images of an epoch are unreadable."""

    def __init__(self, max_fraction):
        self.max_fraction, self.warned = max_fraction, set()

    def count(self, messages, skipped, epoch_images):
        """skipped + the unreadable images among a batch's messages ("" for an image that was read)."""
        for message in filter(None, messages):
            skipped += 1
            if message not in self.warned:
                self.warned.add(message)
                tqdm.write(f"WARNING: skipped an unreadable image (replaced by the next one): {message}",
                           file=sys.stderr)
        if skipped > self.max_fraction * epoch_images:
            raise ConfigError(f"{skipped} unreadable images so far in this epoch, more than --max_bad_fraction "
                              f"{self.max_fraction} of its {epoch_images} images (per process): repair or remove the "
                              f"files named in the warnings, or raise --max_bad_fraction")
        return skipped


def ignore_stop_signals(worker_id):
    """Workers leave SIGINT (Ctrl-C reaches the whole process group) and SIGTERM to the main process, which stops
    after a step (run_control.StopFlag); a worker that died of them would make the DataLoader fail instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
