"""Compose the images of an ``image2image.py -gt`` run into a triangular array (``sd-triangle`` once installed).

    python image2image.py --steps 200 -sd 20 -gt original.png 'A lit fireplace' -o fire.png
    python TriangularArray.py fire.png            # -> fire_triangle.png

The code lives in stable_diffusion/scripts/triangular_array.py.
"""

from stable_diffusion.scripts.triangular_array import run

if __name__ == "__main__":
    run("TriangularArray.py")
