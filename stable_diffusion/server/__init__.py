"""An HTTP server speaking AUTOMATIC1111's ``/sdapi/v1`` API, with a web page, on the library.

    pip install -e ".[server]"
    python -m stable_diffusion.server --model sd-1.5          # http://127.0.0.1:7860

``app`` builds the FastAPI application, ``jobs`` is the one queue its jobs run in, ``generation``
turns an A1111 request into the facade's calls, ``a1111`` holds the request and answer shapes,
``catalog`` the checkpoints and LoRAs it offers, ``static/`` the page.
"""
