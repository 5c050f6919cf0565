"""Start ``python -m stable_diffusion.server`` as a subprocess for a test, and stop it after.

    with serve(tiny_sd1, "--api-auth", "u:p") as server:
        requests.get(server.url + "/sdapi/v1/options")

The server is asked for a free port (``--port 0``) and reports the one it took on its
"Running on http://HOST:PORT" line; ``serve`` waits for that line (or the process's end).
"""

import os
import re
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

READY = re.compile(r"Running on (http://\S+)")


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    output: list = field(default_factory=list)  # every line it printed, stdout and stderr together

    def log(self) -> str:
        return "".join(self.output)


@contextmanager
def serve(model, *args, timeout: float = 240, env=None):
    command = [sys.executable, "-m", "stable_diffusion.server", "--model", str(model), "--port", "0", *map(str, args)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
    )
    output, ready = [], threading.Event()
    url = []

    def read():
        for line in process.stdout:
            output.append(line)
            match = READY.search(line)
            if match and not url:
                url.append(match.group(1))
                ready.set()
        ready.set()  # the process ended

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(timeout) or not url:
            raise RuntimeError(f"the server did not start ({' '.join(command)}):\n{''.join(output)}")
        yield Server(url[0], process, output)
    finally:
        process.kill()
        process.wait()
