"""Prompt text to the UNet's context, as AUTOMATIC1111's webui builds it.

Follows A1111's ``modules/sd_hijack_clip.py`` (``FrozenCLIPEmbedderWithCustomWordsBase``:
``tokenize_line``, ``process_tokens``, ``forward``), ``sd_hijack_open_clip.py`` (SD 2.x and SDXL's
OpenCLIP), ``sd_emphasis.py``, ``sd_hijack.py`` (``EmbeddingsWithFixes``) and ``sd_models_xl.py``:

- The prompt is parsed into (text, weight) pieces (``prompts.parse_prompt_attention``) and each
  piece is tokenized on its own, without BOS/EOS.
- Tokens fill chunks of 75. When a chunk is full and the next token is not a comma, the tokens after
  the chunk's last comma move to the next chunk if that comma is at most 20 tokens from the end
  (A1111's ``comma_padding_backtrack``, default 20). ``BREAK`` closes the chunk. The name of a
  textual-inversion embedding is replaced by its vectors, which never straddle two chunks: a chunk
  without room for them is closed first.
- A chunk is BOS + 75 + EOS, a short one filled with EOS; everything after its first EOS then
  becomes the tokenizer's pad id (CLIP ViT-L: EOS again, 49407; OpenCLIP: 0, "!").
- All chunks of a prompt go through the encoder as one batch, and their hidden states are joined
  along the sequence axis: (1, 77 k, D). Cross-attention takes any length, so the UNet is unchanged.
- Emphasis "Original": per chunk ``z * w``, rescaled so that its mean is the unweighted mean again;
  "No norm": ``z * w``; "None": brackets are plain text (the whole prompt is one piece of weight 1,
  ``BREAK`` included), as A1111 skips its parser then.

Which hidden state (A1111's ``CLIP_stop_at_last_layers``, "Clip skip"):

- SD 1.x (OpenAI CLIP ViT-L): ``final_layer_norm(hidden_states[-clip_skip])``; 1 is
  ``last_hidden_state``.
- SD 2.x (OpenCLIP ViT-H): A1111 ignores clip skip; its OpenCLIP embedder always takes the
  penultimate layer and ``ln_final``, which is the ``last_hidden_state`` of diffusers' SD 2 text
  encoder (converted without its last layer).
- SDXL: ``hidden_states[-2]`` of both encoders, without the final norm; A1111 ignores clip skip here
  too unless its ``sdxl_clip_l_skip`` option (off by default, not offered here) is set. The pooled
  embedding is the second encoder's projection of the first chunk, before any emphasis.

Two A1111 behaviours kept on purpose, so that its prompts give its images:

- An embedding among the tokens that the comma backtrack moves to the next chunk keeps its vectors
  at its old place in the closed chunk (over the EOS filling); the next chunk gets its placeholder
  ids (0) as plain tokens. A1111 moves the tokens but not the embedding's position.
- ``encode_batch`` (prompt editing: one prompt's scheduled texts, as A1111 encodes them together)
  pads every text to the same number of chunks with empty chunks, and "Original" emphasis takes the
  mean of chunk i over all the texts of the batch.

Where every weight is 1, "Original" emphasis is skipped: A1111 computes ``z * 1 * (m / m)`` with
``m`` the mean of the same values twice, which is ``z`` exactly in IEEE arithmetic (``m / m == 1``
for finite nonzero ``m``). So a plain prompt within 75 tokens gives the diffusers path's embeddings
bit for bit (the same 77 ids, one row through the same encoder). Emphasis is computed in float32 and
cast back to the encoder's dtype.
"""

from collections import Counter
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

from .clip import CLIPTextModel
from .embeddings import Embedding, check_fits
from .prompts import EMPHASES, SYNTAXES, parse_prompt_attention
from .tokenizer import MAX_TEXT_CHARS, Tokenizer

CHUNK_LENGTH = 75  # tokens of the prompt per chunk: the 77 positions less BOS and EOS
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
_COMMA = ",</w>"


@dataclass(frozen=True)
class TextOptions:
    """How a prompt is read: A1111 syntax or literal text, emphasis, clip skip, embeddings."""

    syntax: str = "a1111"  # "a1111" or "none" (the text as diffusers reads it: one chunk, cut at 75 tokens)
    emphasis: str = "Original"  # "Original", "No norm" or "None"
    clip_skip: int = 1
    embeddings: tuple = ()  # of embeddings.Embedding


@dataclass
class Encoded:
    """One prompt's conditioning and what the encoding did."""

    context: mx.array  # (1, 77 * chunks, D)
    pooled: Optional[mx.array]  # (1, P): SDXL only
    chunks: int
    tokens: int  # A1111's token count: 75 per closed chunk plus the last chunk's tokens
    embeddings_used: tuple[str, ...]  # names, in order of first use
    dropped: str  # "" unless part of the prompt was left out (syntax "none" past 75 tokens)


@dataclass(frozen=True)
class Chunk:
    """One encoder row: its 77 token ids, their weights, and where embedding vectors go."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]
    fixes: tuple[tuple[int, int], ...]  # (position in the row, index into TextOptions.embeddings)


class _Lookup:
    """The embeddings by the token ids of their names: A1111's ``EmbeddingDatabase.find_embedding_at_position``."""

    def __init__(self, tokenizer: Tokenizer, embeddings: tuple, encoder: int):
        self.by_first_id: dict[int, list] = {}
        for index, embedding in enumerate(embeddings):
            ids = tokenizer.tokenize(embedding.name)[1:-1]
            if ids:
                self.by_first_id.setdefault(ids[0], []).append((ids, index, len(embedding.vectors[encoder])))
        for matches in self.by_first_id.values():
            matches.sort(key=lambda match: len(match[0]), reverse=True)  # longest name first; stable for ties

    def at(self, ids: list[int], position: int) -> Optional[tuple[int, int, int]]:
        """(embedding index, name length in tokens, vectors) of the embedding whose name starts at ``position``."""
        for name_ids, index, n_vectors in self.by_first_id.get(ids[position], ()):
            if ids[position : position + len(name_ids)] == name_ids:
                return index, len(name_ids), n_vectors
        return None


class _ChunkBuilder:
    """A1111's ``tokenize_line``: pieces of token ids in, chunks of 77 out."""

    def __init__(self, tokenizer: Tokenizer, lookup: _Lookup):
        self.tokenizer = tokenizer
        self.lookup = lookup
        self.comma = tokenizer.vocab.get(_COMMA)
        self.chunks: list[Chunk] = []
        self.count = 0  # A1111's token_count
        self._start()

    def _start(self, tokens=(), weights=()):
        self.tokens, self.weights, self.fixes, self.last_comma = list(tokens), list(weights), [], -1

    def close(self, last: bool = False):
        """End the chunk: BOS, its tokens, EOS filling up to 75, EOS; pad after the first EOS."""
        t = self.tokenizer
        self.count += len(self.tokens) if last else CHUNK_LENGTH
        fill = max(CHUNK_LENGTH - len(self.tokens), 0)
        tokens = [t.bos, *self.tokens, *[t.eos] * fill, t.eos]
        first_eos = tokens.index(t.eos)
        tokens[first_eos + 1 :] = [t.pad] * (len(tokens) - first_eos - 1)
        weights = (1.0, *self.weights, *[1.0] * fill, 1.0)
        fixes = tuple((position + 1, index) for position, index in self.fixes)  # + 1: after BOS
        self.chunks.append(Chunk(tuple(tokens), weights, fixes))
        self._start()

    def add(self, ids: list[int], weight: float):
        """Append one parsed piece's token ids with its weight."""
        position = 0
        while position < len(ids):
            if ids[position] == self.comma:
                self.last_comma = len(self.tokens)
            elif len(self.tokens) == CHUNK_LENGTH and self.last_comma != -1 and CHUNK_LENGTH - self.last_comma <= COMMA_BACKTRACK:
                self._move_words_after_last_comma()
            if len(self.tokens) == CHUNK_LENGTH:
                self.close()
            found = self.lookup.at(ids, position)
            if found is None:
                self.tokens.append(ids[position])
                self.weights.append(weight)
                position += 1
                continue
            index, name_length, n_vectors = found
            if len(self.tokens) + n_vectors > CHUNK_LENGTH:
                self.close()
            self.fixes.append((len(self.tokens), index))
            self.tokens += [0] * n_vectors  # placeholders: the vectors replace their token embeddings
            self.weights += [weight] * n_vectors
            position += name_length

    def _move_words_after_last_comma(self):
        # The embedding fixes stay with the closed chunk, as in A1111 (see the module docstring).
        split = self.last_comma + 1
        tokens, weights = self.tokens[split:], self.weights[split:]
        del self.tokens[split:], self.weights[split:]
        self.close()
        self._start(tokens, weights)

    def finish(self) -> tuple[list[Chunk], int]:
        if self.tokens or not self.chunks:
            self.close(last=True)
        return self.chunks, self.count


class PromptEncoder:
    """A1111's prompt chunking, emphasis, clip skip and embeddings over our tokenizers and text encoders."""

    def __init__(self, tokenizers: list, text_encoders: list, is_xl: bool):
        if len(tokenizers) != len(text_encoders) or len(tokenizers) != (2 if is_xl else 1):
            raise ValueError(f"expected {2 if is_xl else 1} tokenizers and text encoders, got {len(tokenizers)} and {len(text_encoders)}")
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.is_xl = is_xl

    def encode(self, text: str, options: TextOptions = TextOptions()) -> Encoded:
        """One prompt (no scheduling syntax or LoRA tags left in it) to the UNet's context."""
        return self.encode_batch([text], options)[0]

    def empty_chunk(self, options: TextOptions = TextOptions()) -> Encoded:
        """The empty prompt's one chunk, encoded: what A1111 pads shorter conditionings with ("Pad conds")."""
        return self.encode("", options)

    def encode_batch(self, texts: list, options: TextOptions = TextOptions()) -> list:
        """Several texts encoded together as A1111 encodes one prompt's scheduled texts (prompt editing).

        Each distinct text is encoded once. Every result has as many chunks as the longest text
        (the others padded with empty chunks), and "Original" emphasis rescales chunk i by the mean
        over all the texts, each counted as often as it appears in ``texts``.
        """
        if not texts:
            raise ValueError("encode_batch: no texts to encode")
        self._check(options)
        counts = Counter(texts)
        unique = list(counts)
        rows = [self.chunks(text, options) for text in unique]  # per text: (per encoder chunks, count, dropped)
        n_chunks = max(len(chunks[0]) for chunks, _, _ in rows)
        empty = self.chunks("", options)[0]
        per_encoder = []
        for e in range(len(self.text_encoders)):
            padded = [chunks[e] + empty[e] * (n_chunks - len(chunks[e])) for chunks, _, _ in rows]
            per_encoder.append(padded)
        repeats = mx.array([counts[text] for text in unique], dtype=mx.float32)
        contexts, pooled = self._contexts(per_encoder, repeats, options)
        results = {}
        for u, (text, (chunks, count, dropped)) in enumerate(zip(unique, rows)):
            used = dict.fromkeys(options.embeddings[i].name for chunk in chunks[0] for _, i in chunk.fixes)
            results[text] = Encoded(
                context=contexts[u : u + 1].reshape(1, -1, contexts.shape[-1]),  # (1, 77 k, D)
                pooled=None if pooled is None else pooled[u : u + 1],
                chunks=n_chunks,
                tokens=count,
                embeddings_used=tuple(used),
                dropped=dropped,
            )
        return [results[text] for text in texts]

    def chunks(self, text: str, options: TextOptions = TextOptions()) -> tuple[list, int, str]:
        """(the chunks for each text encoder, A1111's token count, what was dropped) of one text."""
        if len(text) > MAX_TEXT_CHARS:  # before the parser: each piece alone may be shorter
            raise ValueError(f"the prompt is {len(text)} characters long; at most {MAX_TEXT_CHARS} are accepted")
        per_encoder = [self._encoder_chunks(e, text, options) for e in range(len(self.tokenizers))]
        _, count, dropped = per_encoder[0]  # the encoders' counts agree: they share CLIP's vocabulary
        return [chunks for chunks, _, _ in per_encoder], count, dropped

    def _encoder_chunks(self, e: int, text: str, options: TextOptions) -> tuple[list, int, str]:
        tokenizer = self.tokenizers[e]
        lookup = _Lookup(tokenizer, options.embeddings, e)
        if options.syntax == "none":
            return _literal_chunk(tokenizer, lookup, text)
        return (*_a1111_chunks(tokenizer, lookup, text, options.emphasis), "")

    def _check(self, options: TextOptions):
        if options.syntax not in SYNTAXES:
            raise ValueError(f"prompt syntax {options.syntax!r}: expected one of {', '.join(SYNTAXES)}")
        if options.emphasis not in EMPHASES:
            raise ValueError(f"emphasis {options.emphasis!r}: expected one of {', '.join(EMPHASES)}")
        layers = self.text_encoders[0].config.num_layers
        if isinstance(options.clip_skip, bool) or not isinstance(options.clip_skip, int) or not 1 <= options.clip_skip <= layers:
            raise ValueError(f"clip_skip={options.clip_skip!r}: expected a whole number from 1 to {layers} (the text encoder's layers)")
        dims = tuple(encoder.config.model_dims for encoder in self.text_encoders)
        for embedding in options.embeddings:
            if not isinstance(embedding, Embedding):
                raise ValueError(f"embeddings: expected Embedding objects (sd.load_embedding), got {type(embedding).__name__}")
            check_fits(embedding, dims)

    def _contexts(self, per_encoder: list, repeats: mx.array, options: TextOptions):
        """Encode (texts, chunks) rows per encoder, weight them; (contexts (U, k, 77, D), pooled (U, P) or None)."""
        hidden, pooled = [], None
        for e, (encoder, texts) in enumerate(zip(self.text_encoders, per_encoder)):
            chunks = [chunk for text_chunks in texts for chunk in text_chunks]
            vectors = [embedding.vectors[e] for embedding in options.embeddings]
            out = _run(encoder, chunks, vectors)
            z = self._hidden_state(encoder, out, options.clip_skip)
            z = z.reshape(len(texts), -1, *z.shape[1:])  # (U, k, 77, D)
            if options.syntax != "none":
                weights = np.array([[chunk.weights for chunk in text_chunks] for text_chunks in texts], dtype=np.float32)
                z = _emphasize(z, weights, repeats, options.emphasis)
            hidden.append(z)
            if self.is_xl and e == 1:
                pooled = out.text_embeds.reshape(len(texts), -1, out.text_embeds.shape[-1])[:, 0]  # the first chunk's
        if self.is_xl:
            return mx.concatenate([hidden[0], hidden[1].astype(hidden[0].dtype)], axis=-1), pooled
        return hidden[0], None

    def _hidden_state(self, encoder: CLIPTextModel, out, clip_skip: int) -> mx.array:
        if self.is_xl:
            return out.hidden_states[-2]
        if clip_skip == 1 or encoder.config.hidden_act != "quick_gelu":
            return out.last_hidden_state  # SD 2.x (OpenCLIP, gelu): A1111 ignores clip skip
        return encoder.text_model.final_layer_norm(out.hidden_states[-clip_skip])


def _a1111_chunks(tokenizer: Tokenizer, lookup: _Lookup, text: str, emphasis: str) -> tuple[list, int]:
    pieces = [(text, 1.0)] if emphasis == "None" else parse_prompt_attention(text)
    builder = _ChunkBuilder(tokenizer, lookup)
    for piece, weight in pieces:
        if piece == "BREAK" and weight == -1:
            builder.close()
        else:
            builder.add(tokenizer.tokenize(piece)[1:-1], weight)
    return builder.finish()


def _literal_chunk(tokenizer: Tokenizer, lookup: _Lookup, text: str) -> tuple[list, int, str]:
    """The text as diffusers reads it: one row of 77, the tokens past 75 dropped; embeddings still expand."""
    ids = tokenizer.tokenize(text)[1:-1]
    tokens, fixes, position = [], [], 0
    while position < len(ids):
        found = lookup.at(ids, position)
        if found is None:
            tokens.append(ids[position])
            position += 1
        else:
            index, name_length, n_vectors = found
            fixes.append((len(tokens) + 1, index))  # + 1: after BOS
            tokens += [0] * n_vectors
            position += name_length
    row, n_dropped = tokenizer.pad_and_truncate([tokenizer.bos, *tokens, tokenizer.eos])
    fixes = tuple((p, i) for p, i in fixes if p < len(row) - 1)
    dropped = f"the last {n_dropped} of {len(tokens)} tokens (CLIP takes {len(row) - 2})" if n_dropped else ""
    return [Chunk(tuple(row), (1.0,) * len(row), fixes)], len(tokens), dropped


def _run(encoder: CLIPTextModel, chunks: list, vectors: list):
    """All chunks through the encoder as one batch, embedding vectors written over their placeholders."""
    ids = mx.array([chunk.tokens for chunk in chunks])  # (N, 77)
    if not any(chunk.fixes for chunk in chunks):
        return encoder(ids)
    embeds = encoder.text_model.embeddings.token_embedding(ids)  # (N, 77, D)
    length = ids.shape[1]
    for row, chunk in enumerate(chunks):
        for position, index in chunk.fixes:
            # A1111's EmbeddingsWithFixes: as many vectors as fit before the row's end.
            n = min(length - position, len(vectors[index]))
            embeds[row, position : position + n] = mx.array(vectors[index][:n]).astype(embeds.dtype)
    return encoder(ids, embeds)


def _emphasize(z: mx.array, weights: np.ndarray, repeats: mx.array, emphasis: str) -> mx.array:
    """A1111's emphasis on z (U, k, 77, D) with weights (U, k, 77); the mean of chunk i spans all texts."""
    if emphasis == "None" or (weights == 1).all():
        return z
    weighted = z.astype(mx.float32) * mx.array(weights)[..., None]
    if emphasis == "Original":
        original = _batch_mean(z.astype(mx.float32), repeats)
        weighted = weighted * (original / _batch_mean(weighted, repeats))
    return weighted.astype(z.dtype)


def _batch_mean(z: mx.array, repeats: mx.array) -> mx.array:
    """Each chunk index's mean over all texts (U, k, 77, D) -> (1, k, 1, 1), text u counted repeats[u] times."""
    means = z.mean(axis=(2, 3))  # (U, k)
    if z.shape[0] > 1:
        means = (means * repeats[:, None]).sum(axis=0, keepdims=True) / repeats.sum()
    return means[..., None, None]
