"""The text conditioning of a run, step by step, as AUTOMATIC1111 applies it.

- Prompt editing and alternation (A1111's ``prompt_parser.get_learned_conditioning_prompt_schedules``
  via ``prompts.prompt_schedules``): a prompt is a list of ``(end_step, text)``; each distinct text is
  encoded once (one batch per prompt, as A1111), and UNet call ``k`` of the run (from 0) takes the first entry with ``k <= end_step``
  (A1111's ``reconstruct_cond_batch``). A 2nd-order sampler makes about two calls a step, so its
  schedule spans ``steps * order`` calls, as A1111's ``total_steps`` does.
- Classifier-free guidance with prompts of different lengths (``sd_samplers_cfg_denoiser.py``):
  when the negative and the prompt have as many 77-token chunks, one batched UNet call
  ``[uncond; cond]``; otherwise two calls, one per half (A1111's default), or, with ``pad_conds``,
  the shorter one padded with the empty prompt's chunk (A1111's "Pad prompt/negative prompt") and one
  call. Without guidance, one call on the prompt alone.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx

from . import prompts


@dataclass(frozen=True)
class Text:
    """One encoded text: the UNet's context (1, 77 k, D) and, for SDXL, the pooled embedding (1, P)."""

    context: mx.array
    pooled: Optional[mx.array]

    @property
    def chunks(self) -> int:
        return self.context.shape[1] // 77


# (end_step, Text) pairs of one prompt, in step order; the last end_step is the schedule's length.
Schedule = list


def schedule(text: str, steps: int, syntax: str, encode_batch: Callable[[list], list]) -> Schedule:
    """The prompt's (end_step, Text) schedule over ``steps``. Its texts are encoded in one batch, as
    A1111 encodes one prompt's schedule (``conditioning.PromptEncoder.encode_batch``: each distinct
    text once, all padded to the same chunks). ``syntax="none"``: the text as is."""
    pieces = _pieces(text, steps, syntax)
    encoded = encode_batch([piece for _, piece in pieces])
    texts = {}  # one Text per distinct text, so that Guidance builds its batches once per text
    for (_, piece), e in zip(pieces, encoded):
        texts.setdefault(piece, e)
    return [(end, texts[piece]) for end, piece in pieces]


def _pieces(text: str, steps: int, syntax: str) -> list:
    """(end_step, text) pairs: A1111's prompt schedule, or the text whole for ``syntax="none"``."""
    return prompts.prompt_schedules(text, steps) if syntax != "none" else [(steps, text)]


def at(entries: Schedule, k: int) -> Text:
    """The entry UNet call k uses: the first whose end_step is >= k (the last past the end, as a PNDM run's extra call)."""
    return next((text for end, text in entries if k <= end), entries[-1][1])


def _repeat(x: mx.array, n: int) -> mx.array:
    return mx.repeat(x, n, axis=0) if x.shape[0] == 1 else x


def _pad(text: Text, chunks: int, empty: Text) -> Text:
    """The text's context with the empty prompt's chunk appended up to ``chunks`` chunks (A1111's pad_cond)."""
    extra = chunks - text.chunks
    if extra <= 0:
        return text
    padding = mx.repeat(empty.context.astype(text.context.dtype), extra, axis=1)
    return Text(mx.concatenate([text.context, padding], axis=1), text.pooled)


class Guidance:
    """The UNet batches of each call of a run: ``batches(k)`` -> [(context, text_time), ...].

    ``text_time(pooled, n)`` builds SDXL's added conditioning for a batch of n from its pooled rows (None for SD 1/2).
    """

    def __init__(
        self,
        cond: Schedule,
        uncond: Optional[Schedule],
        n_images: int,
        text_time: Callable[[Optional[mx.array], int], object],
        pad_conds: bool = False,
        empty: Optional[Text] = None,
    ):
        self.cond, self.uncond, self.n = cond, uncond, n_images
        self.text_time, self.pad_conds, self.empty = text_time, pad_conds, empty
        self._built = {}  # (id cond, id uncond) -> batches: a schedule switches a few times per run

    def batches(self, k: int) -> list:
        c = at(self.cond, k)
        u = None if self.uncond is None else at(self.uncond, k)
        key = (id(c), id(u))
        if key not in self._built:
            self._built[key] = self._build(c, u)
        return self._built[key]

    def _build(self, c: Text, u: Optional[Text]) -> list:
        n = self.n
        if u is None:
            return [(_repeat(c.context, n), self.text_time(_repeat_pooled(c, n), n))]
        if u.chunks != c.chunks and self.pad_conds:
            chunks = max(u.chunks, c.chunks)
            u, c = _pad(u, chunks, self.empty), _pad(c, chunks, self.empty)
        if u.chunks == c.chunks:
            context = mx.concatenate([_repeat(u.context, n), _repeat(c.context, n)])
            pooled = None if c.pooled is None else mx.concatenate([_repeat(u.pooled, n), _repeat(c.pooled, n)])
            return [(context, self.text_time(pooled, 2 * n))]
        return [(_repeat(t.context, n), self.text_time(_repeat_pooled(t, n), n)) for t in (u, c)]


def _repeat_pooled(text: Text, n: int) -> Optional[mx.array]:
    return None if text.pooled is None else _repeat(text.pooled, n)


@dataclass(frozen=True)
class PromptInfo:
    """What reading a prompt gives, before any encoder runs: for ``-v`` and the infotext."""

    tokens: int  # A1111's token count (its longest scheduled text)
    chunks: int  # 77-token chunks
    embeddings: tuple  # names of the embeddings it calls, in order of first use
    loras: tuple = ()  # (name, weight) of its <lora:NAME:W> tags


def describe(encoder, text: str, steps: int, options, loras: tuple = ()) -> PromptInfo:
    """Tokenize and chunk a prompt's scheduled texts as ``schedule`` will encode them (``encoder``: a
    conditioning.PromptEncoder), without running a text encoder."""
    pieces = _pieces(text, steps, options.syntax)
    tokens = chunks = 0
    names = {}
    for piece in dict.fromkeys(piece for _, piece in pieces):
        per_encoder, count, _ = encoder.chunks(piece, options)
        tokens, chunks = max(tokens, count), max(chunks, len(per_encoder[0]))
        names.update(dict.fromkeys(options.embeddings[i].name for chunk in per_encoder[0] for _, i in chunk.fixes))
    return PromptInfo(tokens, chunks, tuple(names), tuple(loras))
