"""Multi-crop data augmentation of DINO (Caron et al. 2021, arXiv:2104.14294).

Sec. 3.1 multi-crop (2 global views at 224 px, N local views at 96 px) and Sec. 3.2 "Implementation details"
(BYOL's data augmentations: flip, color jitter, grayscale, Gaussian blur, solarization). `DataAugmentationDINO` runs
per image in DataLoader workers: uint8 crops (crop, resize, flip) plus all photometric random draws as a small
tensor, from the torch.Generator it is given (training_data.py seeds one per sample); `photometric` applies them on
the device.

Shape letters: B images, V crops per image (2 global + N local), S crop side, P photometric params.
"""
import itertools
import math

import PIL.Image
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# params (V, P=8), one row per crop: brightness, contrast, saturation factors in [0.6, 1.4], [0.6, 1.4],
# [0.8, 1.2] and hue shift in [-0.1, 0.1] (1, 1, 1, 0 when color jitter is not applied); grayscale and
# blur flags (1 or 0); blur sigma ~ U[blur_sigma] (drawn even when blur is 0); solarize flag (1 or 0).
# "Not applied" is the identity, so photometric() runs every op on every sample without branches.
PARAM_COLUMNS = ("brightness", "contrast", "saturation", "hue", "grayscale", "blur", "sigma", "solarize")


class DataAugmentationDINO:
    """One image -> (crops, params): [global 1, global 2, local 1..N] uint8 crops and (V, P) params."""
    color_jitter = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue (BYOL, official)
    color_jitter_p, grayscale_p, flip_p = 0.8, 0.2, 0.5
    ratio = (3 / 4, 4 / 3)  # aspect ratios of RandomResizedCrop

    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=8,
                 global_crop_size=224, local_crop_size=96, blur_sigma=(0.1, 2.0)):
        self.global_crops_scale, self.local_crops_scale = global_crops_scale, local_crops_scale
        self.global_crop_size, self.local_crop_size = global_crop_size, local_crop_size
        self.local_crops_number, self.blur_sigma = local_crops_number, blur_sigma
        # Per crop [global 1, global 2, local 1..N]: blur p = 1.0 / 0.1 / 0.5, solarize p = 0 / 0.2 / 0.
        self.blur_p = torch.tensor([1.0, 0.1] + [0.5] * local_crops_number)  # (V,)
        self.solarize_p = torch.tensor([0.0, 0.2] + [0.0] * local_crops_number)  # (V,)

    def __call__(self, image, generator=None):
        """image: PIL image of any mode, or uint8 tensor (C, H, W) with C = 1 or 3. Crops: uint8 (3, S, S)."""
        if isinstance(image, PIL.Image.Image):
            image = TF.pil_to_tensor(image.convert("RGB"))  # (3, H, W)
        image = image.expand(3, -1, -1)  # (3, H, W): 1 channel -> 3, a no-op for 3
        params = self.draw_params(generator)  # (V, P)
        sizes = [(self.global_crop_size, self.global_crops_scale)] * 2
        sizes += [(self.local_crop_size, self.local_crops_scale)] * self.local_crops_number
        crops = []
        for size, scale in sizes:
            top, left, h, w = random_resized_crop_box(*image.shape[-2:], scale, self.ratio, generator)
            crop = TF.resized_crop(image, top, left, h, w, [size, size], InterpolationMode.BICUBIC, antialias=True)
            flip = torch.rand(1, generator=generator).item() < self.flip_p
            crops.append(crop.flip(-1) if flip else crop)  # horizontal flip with p = flip_p
        return crops, params

    def draw_params(self, generator=None):
        """All photometric random numbers of one image: (V, P), columns as in PARAM_COLUMNS."""
        u = torch.rand(2 + self.local_crops_number, 9, generator=generator)  # (V, 9) one column per draw
        (b, c, s, h), (lo, hi) = self.color_jitter, self.blur_sigma
        jitter = u[:, 0] < self.color_jitter_p  # (V,) bool
        return torch.stack([
            torch.where(jitter, 1 - b + 2 * b * u[:, 1], 1.0),  # brightness ~ U[1 - b, 1 + b]
            torch.where(jitter, 1 - c + 2 * c * u[:, 2], 1.0),  # contrast
            torch.where(jitter, 1 - s + 2 * s * u[:, 3], 1.0),  # saturation
            torch.where(jitter, -h + 2 * h * u[:, 4], 0.0),  # hue ~ U[-h, h]
            (u[:, 5] < self.grayscale_p).float(),
            (u[:, 6] < self.blur_p).float(),
            lo + (hi - lo) * u[:, 7],  # sigma
            (u[:, 8] < self.solarize_p).float(),
        ], dim=1)  # (V, P)


def random_resized_crop_box(height, width, scale, ratio, generator=None):
    """torchvision's RandomResizedCrop.get_params (the same draws) from `generator`: (top, left, h, w).
    Up to 10 tries of area ~ U[scale] * H * W and log-uniform aspect ratio, else the central crop."""
    log_ratio = torch.tensor(ratio).log().tolist()
    for _ in range(10):
        target_area = height * width * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).exp().item()
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            left = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return top, left, h, w
    w, h = width, height
    if width / height < min(ratio):
        h = round(width / min(ratio))
    elif width / height > max(ratio):
        w = round(height * max(ratio))
    return (height - h) // 2, (width - w) // 2, h, w


# --- photometric half: batched, per-sample values (B, 1, 1, 1), each op as in torchvision.transforms.v2
def _gray(x):
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)  # (B, 1, S, S), ITU-R 601-2 luma


def _blend(x, y, ratio):
    return (x * ratio + y * (1 - ratio)).clamp(0, 1)


def adjust_hue(x, hue):
    """Shift the hue through HSV, with torchvision's (and PIL's) formulas: x (B, 3, S, S), hue (B, 1, 1, 1)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    delta = maxc - minc
    gray = delta == 0  # r = g = b: hue and saturation are 0
    s = delta / torch.where(gray, 1.0, maxc)
    rc, gc, bc = ((maxc.unsqueeze(1) - x) / torch.where(gray, 1.0, delta).unsqueeze(1)).unbind(1)
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)  # (B, S, S) in [0, 1)
    h = torch.remainder(h + hue[:, 0], 1.0)  # the shift; hue[:, 0]: (B, 1, 1)
    # Back to RGB: channel n = 5, 3, 1 (R, G, B) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + 6 * h.unsqueeze(1), 6)  # (B, 3, S, S)
    shifted = maxc.unsqueeze(1) * (1 - s.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.where(hue != 0, shifted, x)  # the HSV round trip is not bit-exact: skip it at hue 0


def gaussian_blur(x, sigma, sigma_max):
    """Per-sample Gaussian blur of x (B, C, S, S) with sigma (B,): separable, reflect padding, as torchvision.
    Kernel size 2 * ceil(3 * sigma_max) + 1 (+-3 sigma of the widest), capped at the largest odd number < S."""
    # NOTE: the official code uses PIL's GaussianBlur(radius=sigma), which approximates the Gaussian with
    # box blurs over the whole image; we use an exact Gaussian truncated at 3 * sigma_max.
    B, C, H, W = x.shape
    kernel_size = max(1, min(2 * math.ceil(3 * sigma_max) + 1, W - 1 if W % 2 == 0 else W - 2))
    d = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - kernel_size // 2  # (k,) offsets
    # w(d) = exp(-d^2 / (2 sigma^2)) / sum_d' exp(-d'^2 / (2 sigma^2))
    weight = torch.softmax(-(d**2) / (2 * sigma.view(-1, 1).clamp_min(1e-3) ** 2), dim=1)  # (B, k)
    weight = weight.repeat_interleave(C, dim=0)  # (B*C, k), one kernel per sample and channel
    p = kernel_size // 2
    x = F.pad(x, [p, p, p, p], mode="reflect").view(1, B * C, H + 2 * p, W + 2 * p)  # (1, B*C, H+2p, W+2p)
    x = F.conv2d(x, weight.view(B * C, 1, 1, kernel_size), groups=B * C)  # along W: (1, B*C, H+2p, W)
    x = F.conv2d(x, weight.view(B * C, 1, kernel_size, 1), groups=B * C)  # along H: (1, B*C, H, W)
    return x.view(B, C, H, W)


def photometric(crops, params, mean=IMAGENET_MEAN, std=IMAGENET_STD, sigma_max=None):
    """Apply drawn params: crops uint8 (B, 3, S, S), params (B, P) -> normalized float32 (B, 3, S, S).
    sigma_max sets the blur kernel's size (see gaussian_blur); default: the largest sigma drawn for a blurred
    crop, read from params (pass it when params are on a GPU, to spare a device-to-host copy)."""
    # NOTE: the official code applies jitter, grayscale and blur with PIL on uint8 images in the workers,
    # rounding after every op; we apply them in float32 on the device, batched, after crop/resize/flip.
    if sigma_max is None:
        sigma_max = largest_blur_sigma(params)
    x = crops.float() / 255  # (B, 3, S, S) in [0, 1]
    p = params.float()[:, :, None, None, None].unbind(1)  # P tensors (B, 1, 1, 1)
    brightness, contrast, saturation, hue, grayscale, blur, sigma, solarize = p
    # NOTE: fixed order brightness, contrast, saturation, hue; torchvision's ColorJitter, used by the
    # official code, applies the four in a random order drawn per call.
    x = (x * brightness).clamp(0, 1)
    x = _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), contrast)  # towards the mean gray level
    x = _blend(x, _gray(x), saturation)
    x = adjust_hue(x, hue)
    x = torch.where(grayscale > 0, _gray(x).expand_as(x), x)
    if sigma_max > 0:  # some crop of the batch is blurred
        x = torch.where(blur > 0, gaussian_blur(x, sigma.view(-1), sigma_max), x)
    x = torch.where((solarize > 0) & (x >= 0.5), 1 - x, x)  # solarize: threshold 0.5 (128 of 255)
    return TF.normalize(x, mean, std)


def largest_blur_sigma(params):
    """The largest sigma drawn for a crop whose blur flag is set, 0 when none is: params (..., P)."""
    blur, sigma = params[..., PARAM_COLUMNS.index("blur")], params[..., PARAM_COLUMNS.index("sigma")]
    return float((sigma * (blur > 0)).max()) if params.numel() else 0.0


def photometric_views(crops, params, device, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """A DataLoader batch to the model's views: crops V x uint8 (B, 3, S_v, S_v), params (B, V, P) ->
    V normalized float (B, 3, S_v, S_v) on `device`, the photometric ops run once per crop size."""
    views = []
    for _, group in itertools.groupby(range(len(crops)), key=lambda v: crops[v].shape):  # consecutive same size
        group = list(group)
        x = torch.cat([crops[v] for v in group]).to(device, non_blocking=True)  # (B * n, 3, S, S)
        p = params[:, group].transpose(0, 1).flatten(0, 1)  # (B * n, P), crop-major as x
        sigma_max = largest_blur_sigma(p)  # on the CPU: no wait for the device
        views += photometric(x, p.to(device, non_blocking=True), mean, std, sigma_max).chunk(len(group))
    return views
