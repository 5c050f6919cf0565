"""Generate images from a text prompt and save them as one PNG grid (``sd-txt2image`` once installed).

    python txt2image.py "A photo of an astronaut riding a horse on Mars." --n_images 4 --n_rows 2

The code lives in stable_diffusion/scripts/txt2image.py.
"""

import sys

try:
    from stable_diffusion.scripts.txt2image import run
except KeyboardInterrupt:  # Ctrl-C while MLX and the package load: one line and 130, as later on
    print("\ntxt2image.py: interrupted", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    run("txt2image.py")
