"""Batch jobs for the scripts, split over ``mx.distributed`` ranks: many images, many GPUs or Macs.

``mlx.launch -n K python txt2image.py ...`` starts K copies of a script. Each calls ``Group()``
(``mx.distributed.init()``), builds the same list of items from the same flags, and takes its share:

- an item is one image: (source, seed), where the source is a prompt (txt2image) or an input image
  (image2image); ``k`` (1-based) orders the job source-major and names its file ``<base>_<k>.<ext>``;
- its noise comes from its own seed alone, drawn exactly as a one-image run of the facade draws it
  (``initial_noise``, ``step_noise``), so a batch is a concatenation of one-image draws;
- the batches are fixed by the job (each source's items in chunks of ``batch_size``), whatever K,
  and batch b goes to rank b mod K: every image is computed in the same batch for any K, so
  K = 1, 2, 4 write identical files. Ranks never write the same file.

Rank 0 prints the progress of the whole job (one small ``all_sum`` per round of batches), gathers
the pixels for the grid when one is asked, and checks at the end that every image was written. A
rank that dies makes the others stop with a message naming what is missing (``mlx.launch`` itself
only warns); ``--resume`` skips the images whose file decodes and holds this job's parameters for
them (PNG text chunk, JPEG/WebP EXIF comment), and makes the others again. Files are written
atomically; a temporary file is removed only once its writer is dead. The facade stays
single-process: nothing here changes it.

A stopped or hung rank (SIGSTOP, a frozen host) fails no collective: the others would wait for
ever. So every collective has a watchdog: a rank that waits longer than ``max(10 min, 10 x the
longest stretch between two of its collectives so far)`` (that stretch is one batch's work or
one model load) says how far the job got, that ``--resume`` finishes it, and exits 1. The
environment variable ``SD_MLX_COLLECTIVE_TIMEOUT=S`` sets the limit to S seconds instead (tests,
or batches slower than 10 min). The rank signals no other process: it cannot know the peers' pids
on other hosts, and on one host its parent need not be mlx.launch. mlx.launch then SIGTERMs the
stopped rank and waits for it, so the launcher itself returns only once that rank is continued
(SIGCONT: it then acts on the SIGTERM) or killed.
"""

import collections
import contextlib
import itertools
import math
import operator
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from . import images

MAX_NAMED = 8  # missing files named in an error; the rest are counted
# Images in one job: its plan (an Item and a file name each) stays within a few hundred MB, and
# a list file or a seed range past it is refused before anything is listed.
MAX_IMAGES = 10**6
MAX_LIST_BYTES = 64 * 2**20  # a --prompts or --images file (a million prompts of 64 bytes)
# A collective waits at most max(this, WAIT_FACTOR x the longest stretch between two collectives).
MIN_COLLECTIVE_WAIT = 600.0
WAIT_FACTOR = 10
TIMEOUT_VARIABLE = "SD_MLX_COLLECTIVE_TIMEOUT"  # seconds: a fixed limit instead


class JobStopped(Exception):
    """A collective failed: another rank is gone (its process died or was stopped)."""


class Item(NamedTuple):
    """One image of a job (a tuple: a million of them plan in a second)."""

    k: int  # 1-based position in the job; the file is <base>_<k>.<ext>
    source: int  # index of the prompt (txt2image) or input image (image2image)
    pos: int  # index among its source's images (A1111's "Batch pos")
    seed: int  # the image's own seed: its noise comes from this alone


# ---------------------------------------------------------------------------------------------
# The job: items, batches, shares


def parse_seeds(text: str) -> list[int]:
    """``"1,2,3"``, ``"10-19"`` (inclusive) or a mix (``"1,5-7"``) -> the seeds in that order; ValueError if malformed."""
    ranges = []
    for part in text.split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        try:
            lo = int(first)
            hi = int(last) if dash else lo
        except ValueError:
            raise ValueError(f"--seeds {text!r}: {part!r} is not a seed or a range A-B of seeds") from None
        if hi < lo:
            raise ValueError(f"--seeds {text!r}: the range {part!r} is empty (A-B needs A <= B)")
        if not (0 <= lo and hi < 2**64):
            raise ValueError(f"--seeds {text!r}: seeds must be in [0, 2**64)")
        ranges.append((lo, hi))
    # Counted and compared as ranges, before a single seed is listed: "0-100000000" must not fill the memory.
    count = sum(hi - lo + 1 for lo, hi in ranges)
    if count > MAX_IMAGES:
        raise ValueError(f"--seeds {text!r} lists {count} seeds; a job makes at most {MAX_IMAGES} images (split it into several jobs)")
    ordered = sorted(ranges)
    if any(nxt[0] <= prev[1] for prev, nxt in zip(ordered, ordered[1:])):
        raise ValueError(f"--seeds {text!r}: a seed is listed twice")
    return [seed for lo, hi in ranges for seed in range(lo, hi + 1)]


def read_list(path: str, what: str) -> list[str]:
    """The non-blank lines of a text file (stripped), or ValueError naming the file.

    Only a regular file of at most MAX_LIST_BYTES is read, and at most MAX_IMAGES lines are kept:
    a FIFO or a device would block or never end, a huge file would fill the memory before any check.
    """
    with images.open_regular(path, f"{what} file") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            data = f.read(MAX_LIST_BYTES + 1) if size <= MAX_LIST_BYTES else b""  # +1: the file may grow meanwhile
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{what} file {str(path)!r} cannot be read ({e})") from None
    if max(size, len(data)) > MAX_LIST_BYTES:
        raise ValueError(f"{what} file {str(path)!r} is larger than {MAX_LIST_BYTES // 2**20} MB; split it into several jobs")
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{what} file {str(path)!r} has no non-blank line")
    if len(lines) > MAX_IMAGES:
        raise ValueError(f"{what} file {str(path)!r} has {len(lines)} lines; a job makes at most {MAX_IMAGES} images (split it into several jobs)")
    return lines


def check_job_size(n_sources: int, n_seeds: int):
    """ValueError when ``n_sources`` x ``n_seeds`` images exceed MAX_IMAGES (cheap: call it before loading a model)."""
    if n_sources * n_seeds > MAX_IMAGES:
        raise ValueError(f"{n_sources} prompts or images x {n_seeds} seeds make {n_sources * n_seeds} images; a job makes at most {MAX_IMAGES} (split it into several jobs)")


def make_items(n_sources: int, seeds: list[int]) -> list[Item]:
    """Every (source, seed) pair, source-major: the job's stable order."""
    check_job_size(n_sources, len(seeds))
    items = []
    for source in range(n_sources):
        for pos, seed in enumerate(seeds):
            items.append(Item(k=len(items) + 1, source=source, pos=pos, seed=seed))
    return items


def seeds_for(seed: int, n_images: int) -> list[int]:
    """``--seed S --n_images N``: image j gets seed S + j, as AUTOMATIC1111 numbers a batch."""
    return [(seed + j) % 2**64 for j in range(n_images)]


def make_batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Each source's items in chunks of ``batch_size``: fixed by the job, the same for any number of ranks."""
    batches = []
    # One pass over the items grouped by source (a stable sort): linear in the job, not sources x items.
    by_source = operator.attrgetter("source")
    for _, group in itertools.groupby(sorted(items, key=by_source), key=by_source):
        mine = list(group)
        batches += [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    return batches


def share(n_batches: int, rank: int, size: int) -> list[int]:
    """The batches rank ``rank`` of ``size`` runs: b mod size == rank."""
    return list(range(rank, n_batches, size))


# ---------------------------------------------------------------------------------------------
# Noise: each image's from its own seed, exactly as a one-image run draws it


def _seed_keys(seed: int):
    return mx.random.split(mx.random.key(seed))  # (initial noise key, step noise key), as the facade splits a seed


def initial_noise(seeds: list[int], shape: tuple) -> mx.array:
    """(len(seeds), *shape) unit normal noise, row i what ``generate_latents(seed=seeds[i], n_images=1)`` draws."""
    return mx.concatenate([mx.random.normal((1, *shape), key=_seed_keys(s)[0]) for s in seeds])


def step_noise(seeds: list[int], n_calls: int) -> Callable[[int, tuple], mx.array]:
    """A stochastic sampler's noise per UNet call, row i that of a one-image run with ``seeds[i]``.

    ``n_calls``: the sampler's timesteps for the run's steps (the facade's ``denoising_calls(steps)``):
    the facade splits the step key into that many, and so must this, to draw the same noise."""
    keys = [mx.random.split(_seed_keys(s)[1], n_calls) for s in seeds]
    mx.eval(keys)  # in this thread: MLX evaluates an array only where its stream lives, and the steps may run in a worker

    def noise(i: int, shape: tuple) -> mx.array:
        return mx.concatenate([mx.random.normal((1, *shape[1:]), key=k[i]) for k in keys])

    return noise


# ---------------------------------------------------------------------------------------------
# The group of ranks


class Group:
    """``mx.distributed.init()`` and the few collectives a job needs (a size-1 group when not launched)."""

    def __init__(self):
        self.fixed_timeout = _timeout_from_environment()  # before joining: a bad value stops every rank alike
        try:
            self.group = mx.distributed.init()
        except RuntimeError as e:  # e.g. "[ring] Couldn't bind socket (error: 98)": another program holds the port
            print(
                f"{Path(sys.argv[0]).name}: error: this rank cannot join the mlx.launch group ({e}); "
                "if a port is in use, give mlx.launch another --starting-port",
                file=sys.stderr,
            )
            sys.exit(2)
        self.rank, self.size = self.group.rank(), self.group.size()
        # NCCL reduces on the GPU; ring (TCP) and the Mac backends on the CPU.
        self.stream = mx.gpu if mx.cuda.is_available() and "MLX_HOSTFILE" not in os.environ else mx.cpu
        self.longest = 0.0  # the longest stretch from one collective's end (or this init) to the next's
        self.last = time.monotonic()
        # Called (from the watchdog's thread) with the seconds waited when a collective times out;
        # run() makes it the job's report. It must not return: the rank is stuck in the collective.
        self.on_stall: Callable[[float], None] = lambda waited: self.exit_stalled(f"{Path(sys.argv[0]).name}: error: {self.stall_reason(waited)}")

    def timeout(self) -> float:
        """How long the next collective may wait (see the module docstring)."""
        if self.fixed_timeout is not None:
            return self.fixed_timeout
        return max(MIN_COLLECTIVE_WAIT, WAIT_FACTOR * self.longest)

    def stall_reason(self, waited: float) -> str:
        return f"rank {self.rank} waited {waited:.0f} s for the other ranks: a rank stopped or hung?"

    @staticmethod
    def exit_stalled(line: str):
        print(line, file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)  # the main thread is inside the collective: only the process can end it

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_sum(self, x: np.ndarray) -> np.ndarray:
        """Sum over ranks. A lost peer raises JobStopped, and from then on SIGTERM is ignored (the rank reports and exits).

        mlx.launch SIGTERMs every rank once one fails, racing the survivors' account of the job. On
        the CPU backends (ring over TCP) a dead peer fails the collective at once, so SIGTERM is
        held until it returns and then delivered; NCCL may wait for ever on a dead peer, so there
        SIGTERM kills at once (a Python handler cannot run while it waits; no file is open).
        """
        if not self.distributed:
            return x
        held = []
        previous = signal.signal(signal.SIGTERM, (lambda signum, frame: held.append(signum)) if self.stream == mx.cpu else signal.SIG_DFL)
        try:
            with self._watched():
                y = mx.distributed.all_sum(mx.array(x), group=self.group, stream=self.stream)
                mx.eval(y)
                result = np.array(y)
        except RuntimeError as e:
            previous = signal.SIG_IGN  # the job is over for this rank: nothing may cut its report short
            raise JobStopped(str(e)) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
        if held:
            signal.raise_signal(signal.SIGTERM)  # now the script's own handler runs
        return result

    @contextlib.contextmanager
    def _watched(self):
        """A collective under the watchdog; its stretch since the previous one counts toward the next limit."""
        limit = self.timeout()
        start = time.monotonic()
        with watchdog(limit, lambda: self.on_stall(time.monotonic() - start)):
            yield
        self.longest = max(self.longest, time.monotonic() - self.last)
        self.last = time.monotonic()

    def broadcast_seed(self, draw: Callable[[], int]) -> int:
        """Rank 0 draws (and prints) a seed; every rank gets it."""
        seed = draw() if self.rank == 0 else 0
        # As two 32-bit halves: a seed in [2**63, 2**64) does not fit the int64 the collectives sum.
        high, low = self.all_sum(np.array([seed >> 32, seed & 0xFFFFFFFF], dtype=np.int64))
        return int(high) << 32 | int(low)


@contextlib.contextmanager
def watchdog(limit: float, expired: Callable[[], None]):
    """Call ``expired()`` from another thread if the block is still running after ``limit`` seconds.

    A thread, not SIGALRM: MLX retries a ring wait that a signal interrupts, but releases the GIL
    while it waits, so a thread runs. The lock keeps a block that ends just then from going on
    while ``expired`` reports (and exits).
    """
    lock = threading.Lock()
    over = threading.Event()

    def fire():
        with lock:
            if not over.is_set():
                expired()

    timer = threading.Timer(limit, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            over.set()
        timer.cancel()


def _timeout_from_environment() -> Optional[float]:
    text = os.environ.get(TIMEOUT_VARIABLE)
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (0 < seconds < math.inf):
        print(f"{Path(sys.argv[0]).name}: error: {TIMEOUT_VARIABLE}={text!r} is not a positive number of seconds; set it to one or unset it", file=sys.stderr)
        sys.exit(2)
    return seconds


# ---------------------------------------------------------------------------------------------
# Running a job


@dataclass
class Job:
    """What a script hands to ``run``: the items, how to make and label a batch, where files go."""

    prog: str
    items: list[Item]
    batch_size: int
    output: Path  # the grid's path; image k is images.sibling(output, k)
    generate: Callable[[list[Item]], Iterator[mx.array]]  # a batch -> latents per step, as the facade yields them
    steps: int  # steps the generator yields (for the progress bar)
    decode: Callable[[mx.array, list[Item]], np.ndarray]  # a batch's latents and items -> its (B, H, W, 3) uint8 pictures
    parameters: Callable[[Item, int], str]  # (item, images of its source) -> the PNG's A1111 text
    individual: bool = True  # one file per image (False: only the grid, in one process)
    image_size: tuple = (0, 0)  # (width, height) of every image; needed for the grid
    grid_rows: Optional[int] = None  # write the grid with this many rows (None: no grid)
    grid_parameters: str = ""
    resume: bool = False
    verbose: bool = False


def path_of(job: Job, item: Item) -> Path:
    return images.sibling(job.output, item.k)


def run(job: Job, group: Group) -> list[Path]:
    """Run this rank's share of ``job``; on rank 0 also the progress, the grid and the final check.

    Returns the job's files: one per image (when ``job.individual``), then the grid (rank 0, when asked).
    """
    batches = make_batches(job.items, job.batch_size)
    mine = share(len(batches), group.rank, group.size)
    rounds = math.ceil(len(batches) / group.size)
    lead = group.rank == 0
    per_source = collections.Counter(it.source for it in job.items)  # a PNG names its source's image count
    # Temporary files of killed earlier runs, on any run (a live writer's are kept).
    ours = [path_of(job, item) for b in mine for item in batches[b]] if job.individual else []
    images.remove_stale_parts(ours + ([job.output] if lead and job.grid_rows else []))

    finished = {it.k for b in mine for it in batches[b] if _finished(job, it, per_source)}
    done_here = set()
    pixels = {}  # k -> picture, kept only for the grid
    progress = tqdm(total=len(job.items), desc="images", unit="image", disable=not lead, leave=False)
    start = time.perf_counter()
    group.on_stall = lambda waited: _report_stall(job, group, progress, waited)
    try:
        already = int(group.all_sum(np.array([len(finished)], dtype=np.int64))[0])
        if lead and already:
            print(f"--resume: {already} of {len(job.items)} images already written, skipped")
        progress.update(already)
        for r in range(rounds):
            wrote = 0
            b = r * group.size + group.rank
            if b < len(batches):
                wrote = _run_batch(job, batches[b], finished, per_source, pixels, lead)
                done_here.update(it.k for it in batches[b])
            # One small collective per round: the progress of the whole job, and a lost rank noticed early.
            progress.update(int(group.all_sum(np.array([wrote], dtype=np.int64))[0]))
        progress.close()
        grid = _gather_grid(job, group, pixels) if job.grid_rows else None
        counts = group.all_sum(np.array([len(done_here)], dtype=np.int64))
    except JobStopped as e:  # SIGTERM is ignored from here (Group.all_sum): no file is open, nothing is half-written
        progress.close()
        _report_stop(job, group, f"another rank stopped ({e})")
        sys.exit(1)
    except (KeyboardInterrupt, SystemExit) as e:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        progress.close()
        code = getattr(e, "code", 130)
        why = "interrupted" if code != 143 else "SIGTERM; mlx.launch sends it to every rank when one fails" if group.distributed else "SIGTERM"
        _report_stop(job, group, why)
        raise

    written = [path_of(job, it) for it in job.items] if job.individual else []
    if not lead:
        return written
    if int(counts[0]) != len(job.items):  # every rank ran its share to the end: this is a bug, not a lost rank
        missing = [p for p in written if not p.exists()]
        names = ", ".join(p.name for p in missing[:MAX_NAMED]) + (f" and {len(missing) - MAX_NAMED} more" if len(missing) > MAX_NAMED else "")
        print(f"{job.prog}: error: {len(job.items) - int(counts[0])} of {len(written)} images were not made ({names}); run the same command with --resume to finish", file=sys.stderr)
        sys.exit(1)
    if grid is not None:
        images.save_image(images.grid(grid, job.grid_rows), job.output, job.grid_parameters)
        written.append(job.output)
    if job.verbose:
        elapsed = time.perf_counter() - start
        made = len(job.items) - already
        print(f"{made} images in {elapsed:.2f} s on {group.size} rank(s): {made / elapsed:.3f} images/s", file=sys.stderr)
    return written


def _run_batch(job: Job, batch: list[Item], finished: set, per_source: collections.Counter, pixels: dict, lead: bool) -> int:
    """Denoise, decode and save one batch; returns how many files it wrote (0 when all were finished)."""
    todo = [it for it in batch if it.k not in finished]
    if not todo:
        if job.grid_rows:
            for it in batch:
                pixels[it.k] = _read_pixels(path_of(job, it))
        return 0
    x_t = None
    steps = job.generate(batch)  # the whole batch, also when some of it exists: the same batch for any K
    bar = tqdm(steps, total=job.steps, desc=f"images {batch[0].k}-{batch[-1].k}", leave=False, disable=not lead)
    for x_t in bar:
        mx.eval(x_t)
    pictures = job.decode(x_t, batch)
    for item, picture in zip(batch, pictures):
        if item in todo and job.individual:
            images.save_image(picture, path_of(job, item), job.parameters(item, per_source[item.source]))
        if job.grid_rows:
            pixels[item.k] = picture
    return len(todo)


def _finished(job: Job, item: Item, per_source: collections.Counter) -> bool:
    """--resume: the file decodes whole and its parameters are what this job writes for the item.

    A truncated or empty file, another job's image (another prompt, seed, size, model...) or a
    picture without parameters is made again: the new file replaces it atomically.
    """
    if not (job.resume and job.individual):
        return False
    try:
        stored, (width, height) = images.read_back(path_of(job, item))
    except ValueError:
        return False
    expected = job.parameters(item, per_source[item.source])
    return stored == expected and images.parse_parameters(expected).get("Size") == f"{width}x{height}"


def _read_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _gather_grid(job: Job, group: Group, pixels: dict) -> np.ndarray:
    """All the job's pictures on every rank, in job order: an all_sum of each rank's own over zeros."""
    w, h = job.image_size
    stack = np.zeros((len(job.items), h, w, 3), dtype=np.uint8)
    for k, picture in pixels.items():
        stack[k - 1] = picture
    return group.all_sum(stack)


def _report_stop(job: Job, group: Group, why: str):
    line = _stop_line(job, group, why) if group.rank == 0 else None  # rank 0 speaks for the job
    if line:
        print(line, file=sys.stderr)


def _stop_line(job: Job, group: Group, why: str) -> Optional[str]:
    """How far the job got, from this rank's view of the files (None when it has no files or all are written)."""
    if not job.individual:
        return None
    written = [path_of(job, it) for it in job.items]
    missing = [p for p in written if not p.exists()]
    if not missing:
        return None
    where = " on this machine" if group.distributed else ""
    return (
        f"{job.prog}: error: the job stopped ({why}): {len(written) - len(missing)} of {len(written)} images are written{where}; "
        "run the same command with --resume to finish"
    )


def _report_stall(job: Job, group: Group, progress: tqdm, waited: float):
    """The watchdog's report, from whichever rank timed out (from the watchdog's thread)."""
    progress.close()
    why = group.stall_reason(waited)
    group.exit_stalled(_stop_line(job, group, why) or f"{job.prog}: error: {why}")
