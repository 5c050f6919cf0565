"""``python -m stable_diffusion.server --model MODEL``: serve A1111's API and the page until Ctrl-C.

Prints ``Running on http://HOST:PORT`` once it accepts requests (``--port 0``: a free port, named
there). Bad flags or a model that does not load: one line on stderr, exit status 2.
"""

import os
import socket
import sys
import threading
import time

from .. import cli, images
from ..errors import ModelLoadError, one_line

PROG = "python -m stable_diffusion.server"


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog=PROG, description="Serve AUTOMATIC1111's /sdapi/v1 API and a web page on a Stable Diffusion model in MLX.")
    parser.add_argument("--model", default="sd-1.5", help="the model loaded at the start: a preset, a Hub repo id, a diffusers folder or a .safetensors file")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=7860, help="the port (0: a free one, printed on the 'Running on' line)")
    parser.add_argument("--listen", action="store_true", help="listen on every interface (0.0.0.0), as A1111's --listen")
    parser.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER2:PASS2]", help="HTTP Basic credentials required on every route")
    parser.add_argument("--models-dir", default=None, metavar="DIR", help="a folder of .safetensors checkpoints and diffusers folders offered by /sd-models")
    parser.add_argument("--lora-dir", default=None, metavar="DIR", help="the folder of the LoRAs that prompts name with <lora:NAME:W>")
    parser.add_argument("--output-dir", default="outputs", metavar="DIR", help="where save_images writes (DIR/txt2img-images/DATE/NNNNN-SEED.png); nothing is written elsewhere")
    parser.add_argument("--save-images", action="store_true", help="save every picture, as if each request set save_images (A1111's API default is off)")
    parser.add_argument("--float16", action="store_true", help="run the model in float16")
    parser.add_argument("--preview-every", type=int, default=0, metavar="N", help="every N steps, /progress's current_image shows the first image decoded small (0: no previews)")
    parser.add_argument("--max-pixels", type=int, default=2048 * 2048, help="the largest width x height a request (or its pictures) may have")
    parser.add_argument("--max-images", type=int, default=100, help="the most images (batch_size x n_iter) one request may ask for")
    args = parser.parse_args(argv)
    if args.listen:
        args.host = "0.0.0.0"
    for flag in ("preview_every",):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0")
    for flag in ("max_pixels", "max_images"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not 0 <= args.port < 65536:
        parser.error(f"--port {args.port} is not a port number (0-65535)")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        import uvicorn

        from . import app as server_app
        from . import generation
    except ImportError as e:
        raise cli.UsageError(f"the server needs FastAPI and uvicorn ({e}): pip install -e \".[server]\"") from None
    try:
        credentials = server_app.parse_auth(args.api_auth) if args.api_auth else None
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    cli.check_model_name(args.model)
    settings = generation.Settings(
        model=args.model,
        models_dir=args.models_dir,
        lora_dir=args.lora_dir,
        output_dir=args.output_dir,
        save_images=args.save_images,
        float16=args.float16,
        preview_every=args.preview_every,
        max_pixels=args.max_pixels,
        max_images=args.max_images,
    )
    # What a killed server was writing: its half-written .part files (the finished pictures stay).
    images.remove_stale_parts_under(args.output_dir)
    app = server_app.create_app(settings, credentials)
    models = app.state.models
    try:
        models.get(models.current)  # loaded before the first request, so a bad model stops the start
    except (ValueError, ModelLoadError) as e:
        raise cli.UsageError(f"--model {args.model!r}: {one_line(e)}") from None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise cli.UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))

    def announce():
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            print(f"Running on http://{host}:{port}", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    server.run(sockets=[sock])
    sys.stdout.flush()
    sys.stderr.flush()
    # A generation may still be computing on the worker thread; MLX's teardown under it aborts the
    # interpreter (see interruptible.py), so the process ends here, its answers all sent.
    os._exit(0)


if __name__ == "__main__":
    cli.run_cli(main, PROG)
