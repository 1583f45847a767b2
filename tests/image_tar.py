"""Writes small image datasets in the ``tar:`` layout (members ``train/<class>/<file>.png``)."""

import io
import tarfile

import numpy as np
from PIL import Image


def write_image_tar(path, images_by_class: dict[str, list[np.ndarray]]) -> str:
    """Writes uint8 [H, W, 3] images as PNG members ``train/<class>/<index>.png``; returns the path."""
    with tarfile.open(path, "w") as tar:
        for cls, images in images_by_class.items():
            for i, image in enumerate(images):
                buf = io.BytesIO()
                Image.fromarray(image).save(buf, "PNG")
                info = tarfile.TarInfo(f"train/{cls}/{i:04d}.png")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
    return str(path)
