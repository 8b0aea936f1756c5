"""Image decoding and the few geometric transforms the tokenizer needs (uint8 in, uint8 out)."""

from __future__ import annotations

import io
import random
from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic, antialiased resize so that the short side is `size` (a no-op when it already is)."""
    width, height = image.size
    if min(width, height) == size:
        return image
    scale = size / min(width, height)
    return image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)


def crop_square(image: Image.Image, size: int, rng: Optional[random.Random] = None) -> Image.Image:
    """A `size` square: the centre one, or a random one when `rng` is given."""
    return image.crop(square_box(image, size, rng))


def square_box(image: Image.Image, size: int, rng: Optional[random.Random] = None) -> Tuple[int, int, int, int]:
    free_x, free_y = image.width - size, image.height - size
    left, top = (rng.randint(0, free_x), rng.randint(0, free_y)) if rng else (free_x // 2, free_y // 2)
    return left, top, left + size, top + size


class ImageDecoder:
    """Webdataset sample -> {"image": uint8 [C, H, W], "label": int, "key": str, "view": str}.

    Training: random square crop after the short-side resize and an optional horizontal flip; evaluation:
    the centre crop. `view` names the image after these (key, crop corner, flip): equal views are equal
    pixels, which is what a prefix cache keys on. Raises on a sample without an image or a label, or with
    bytes that do not decode.
    """

    def __init__(self, image_size: int, channels: int, train: bool, hflip: bool = False):
        self.image_size = image_size
        self.mode = "L" if channels == 1 else "RGB"
        self.train = train
        self.hflip = hflip and train

    def __call__(self, sample: dict, rng: random.Random) -> dict:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            raise KeyError(f"sample {sample.get('__key__')} has no image ({', '.join(IMAGE_KEYS)})")
        if "cls" not in sample:
            raise KeyError(f"sample {sample.get('__key__')} has no label (cls)")
        label = int(sample["cls"])
        with Image.open(io.BytesIO(sample[key])) as image:
            image = resize_short_side(image.convert(self.mode), self.image_size)
            box = square_box(image, self.image_size, rng if self.train else None)
            array = np.array(image.crop(box))  # a writable copy: torch tensors must own writable memory
        flip = self.hflip and rng.random() < 0.5
        if flip:
            array = array[:, ::-1]
        array = np.ascontiguousarray(array.reshape(self.image_size, self.image_size, -1).transpose(2, 0, 1))
        view = f"{sample['__key__']}@{box[0]},{box[1]}{'~' if flip else ''}"
        return {"image": torch.from_numpy(array), "label": label, "key": sample["__key__"], "view": view}
