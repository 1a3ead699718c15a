"""A picture of one handwritten digit prepared the way MNIST prepared its digits (predict.py)."""

from __future__ import annotations

import torch


def _pixels(gray_image) -> torch.Tensor:
    """An 8-bit single-channel PIL image as float32 ``(H, W)`` in [0, 1]."""
    import numpy as np

    return torch.from_numpy(np.asarray(gray_image, dtype=np.float32) / 255)


def prepare_digit(image) -> torch.Tensor:
    """A picture of one digit (PIL image, any size and mode) as MNIST prepared its digits.

    Grayscale; inverted when the background is light (MNIST digits are light on dark); cropped to the
    ink; scaled, keeping the aspect ratio, to fit 20x20; and placed in 28x28 so that its centre of mass
    is the centre. Returns float32 ``(28, 28)`` in [0, 1].
    """
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = _pixels(rgba.getchannel("A"))
        gray = _pixels(rgba.convert("L"))
        if alpha.min() < 1:
            # Transparent pixels are background whatever colour they store: put the ink on a
            # background that contrasts with it (dark ink on white, light ink on black).
            ink_level = (gray * alpha).sum() / alpha.sum().clamp_min(1e-6)
            background = 1.0 if ink_level < 0.5 else 0.0
            gray = gray * alpha + background * (1 - alpha)
        x = gray
    else:
        x = _pixels(image.convert("L"))

    border = torch.cat([x[0], x[-1], x[:, 0], x[:, -1]])
    if border.median() > 0.5:
        x, border = 1 - x, 1 - border
    x = (x - border.median()).clamp(min=0)  # background to 0
    if x.max() <= 0:
        raise ValueError("the image is blank: no digit to read")
    x = x / x.max()

    ink = (x > 0.1).nonzero()
    top, left = ink.min(0).values.tolist()
    bottom, right = ink.max(0).values.tolist()
    x = x[top:bottom + 1, left:right + 1]
    h, w = x.shape
    scale = 20 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    pil = Image.fromarray((x * 255).round().to(torch.uint8).numpy())
    digit = _pixels(pil.resize(size, Image.Resampling.LANCZOS))

    canvas = torch.zeros(28, 28)
    top, left = (28 - size[1]) // 2, (28 - size[0]) // 2
    canvas[top:top + size[1], left:left + size[0]] = digit
    mass = canvas.sum()
    ys, xs = torch.arange(28, dtype=torch.float32), torch.arange(28, dtype=torch.float32)
    cy = (canvas.sum(1) * ys).sum() / mass
    cx = (canvas.sum(0) * xs).sum() / mass
    dy, dx = round(13.5 - cy.item()), round(13.5 - cx.item())
    # Shift without wrapping: only as far as the digit's box allows inside 28x28.
    dy = max(-top, min(dy, 28 - top - size[1]))
    dx = max(-left, min(dx, 28 - left - size[0]))
    shifted = torch.zeros(28, 28)
    shifted[top + dy:top + dy + size[1], left + dx:left + dx + size[0]] = digit
    return shifted
