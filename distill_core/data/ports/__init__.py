"""Exact ports of the library calls behind the CCIFAR10-DD corruptions, as batched tensor ops.

`distill_core.data.corruptions` writes Hendrycks & Dietterich's recipes
(``make_cifar_c.py``); the library functions those recipes call are here, one
module per origin, each reproducing its library's arithmetic (borders,
fixed-point rounding, tie rules) so that the recipes give the reference's
bytes:

- `libjpeg`: libjpeg-turbo's baseline JPEG codec (PIL's ``save(..., "JPEG")``);
- `opencv`: Canny, distanceTransform, equalizeHist, box / filter2D / Sobel
  filters, cvtColor to grey, resize (INTER_LINEAR) at 1 / odd scales;
- `skimage`: rgb2hsv / hsv2rgb (the float64 reference oracle of the
  brightness and saturate recipes' closed forms);
- `pil`: Pillow's BOX resize;
- `imagemagick`: MagickMotionBlurImage with its Q16 quantum and 8-bit export;
- `filters`: scipy.ndimage's gaussian_filter (skimage's gaussian) and the
  border conventions the ports share.
"""
