"""The command-line scripts: txt2image, image2image and triangular_array, each with parse_args(), main() and run()."""
