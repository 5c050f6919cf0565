"""Turn an image into another guided by a prompt (img2img) (``sd-image2image`` once installed).

    python image2image.py --strength 0.5 original.png 'A lit fireplace'
    python image2image.py --steps 200 -sd 20 -gt original.png 'A lit fireplace'   # then TriangularArray.py out.png

The code lives in stable_diffusion/scripts/image2image.py.
"""

import sys

try:
    from stable_diffusion.scripts.image2image import run
except KeyboardInterrupt:  # Ctrl-C while MLX and the package load: one line and 130, as later on
    print("\nimage2image.py: interrupted", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    run("image2image.py")
