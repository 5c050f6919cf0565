"""CLIP's byte-level BPE tokenizer, in pure Python.

Follows transformers' ``CLIPTokenizer`` (transformers 5, backed by the ``tokenizers`` library),
which reimplements OpenAI CLIP's ``SimpleTokenizer`` without ftfy:

1. special tokens (BOS, EOS and the pad token) are cut out of the raw text first;
2. each remaining piece is NFC-normalised, whitespace runs become one space, and it is lower-cased
   character by character;
3. CLIP's regex splits it into words (letter runs, single digits, punctuation runs, contractions),
   dropping whitespace, and GPT-2's byte-level regex splits those once more (this only matters
   for a special token spelled in upper case, such as "<|ENDOFTEXT|>": it is not cut out in
   step 1, survives CLIP's regex whole, and ends up as "<|", "endoftext", "|>");
4. each word's UTF-8 bytes are mapped to printable characters (GPT-2's byte-to-unicode table) and
   merged by BPE, the last symbol carrying the ``</w>`` end-of-word suffix.

``tokenize`` returns BOS + ids + EOS; ``pad_and_truncate`` shapes that to the text encoder's
``max_length`` exactly as ``tokenizer(text, padding="max_length", truncation=True)`` does.

Hostile text stays cheap: BPE merges through a heap (n log n in a word's length, like the
``tokenizers`` library, instead of rescanning the word after every merge), ``tokenize(text,
max_tokens=...)`` stops reading the text once it has the tokens the text encoder can take, and a
text longer than ``MAX_TEXT_CHARS`` is refused (one word that long still takes about a second).
"""

import heapq
import json
import unicodedata
from pathlib import Path
from typing import Iterator, Optional

import regex

from .errors import ModelLoadError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CLIP_CONTEXT = 77  # the text encoder's positions
MAX_TEXT_CHARS = 100_000  # thousands of tokens, far more than any prompt chunking uses

_WHITESPACE = regex.compile(r"\s+")
_CLIP_WORDS = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# The ByteLevel pre-tokenizer's own split, applied to each of CLIP's words.
_GPT2_WORDS = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_ENCODER = bytes_to_unicode()
# Cache the BPE of words up to this many bytes, and at most this many of them (prompts repeat
# short words; a hostile text must not fill memory with long or countless distinct ones).
_CACHED_WORD_LENGTH = 64
_CACHE_ENTRIES = 100_000


class Tokenizer:
    """CLIP BPE tokenizer: text -> BOS + token ids + EOS."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        pad_token: str = EOS_TOKEN,
        max_length: int = CLIP_CONTEXT,
        added_tokens: Optional[dict[str, int]] = None,
    ):
        for token in (BOS_TOKEN, EOS_TOKEN, pad_token):
            if token not in vocab:
                raise ValueError(f"special token {token!r} is not in the vocabulary")
        self.vocab = vocab
        self.bpe_ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.bos = vocab[BOS_TOKEN]
        self.eos = vocab[EOS_TOKEN]
        self.pad = vocab[pad_token]
        self.max_length = max_length
        # Special and added tokens are matched in the raw text, longest first. SD 2's pad token is
        # "!", so there every "!" in a prompt becomes the pad id, as it does in transformers.
        self.special = {t: vocab[t] for t in (BOS_TOKEN, EOS_TOKEN, pad_token)} | (added_tokens or {})
        alternatives = sorted(self.special, key=len, reverse=True)
        self._special_re = regex.compile("(" + "|".join(regex.escape(t) for t in alternatives) + ")")
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        """Read a ``tokenizer/`` folder as transformers' ``CLIPTokenizer.from_pretrained`` does.

        The vocabulary and merges come from vocab.json + merges.txt (the Hub's SD repos) or, when
        those are absent, from tokenizer.json (what transformers >= 5 ``save_pretrained`` writes).
        Special tokens follow transformers' precedence: tokenizer_config.json, overridden by
        special_tokens_map.json unless the config is in the newer format (``added_tokens_decoder``).
        This is why SD 2.x pads with "!" (id 0): its special_tokens_map.json says so, while its
        tokenizer_config.json says "<|endoftext|>".
        """
        folder = Path(folder)
        if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
            vocab, merges, added = *_read_vocab_and_merges(folder), {}
        else:
            vocab, merges, added = _read_tokenizer_json(folder / "tokenizer.json")

        config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        if not isinstance(config, dict):
            raise ModelLoadError(f"{folder / 'tokenizer_config.json'}: expected a JSON object")
        special = {k: config.get(k) for k in ("bos_token", "eos_token", "pad_token")}
        decoder = config.get("added_tokens_decoder") or {}
        added |= {(t["content"] if isinstance(t, dict) else t): int(i) for i, t in decoder.items()}
        if "added_tokens_decoder" not in config and (folder / "special_tokens_map.json").is_file():
            overrides = _read_json(folder / "special_tokens_map.json")
            if not isinstance(overrides, dict):
                raise ModelLoadError(f"{folder / 'special_tokens_map.json'}: expected a JSON object")
            special.update({k: v for k, v in overrides.items() if k in special and v})
        special = {k: v["content"] if isinstance(v, dict) else v for k, v in special.items()}
        for key, default in (("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN)):
            if special[key] not in (None, default):
                raise ModelLoadError(f"{folder}: {key} {special[key]!r} is not CLIP's {default!r}")
        try:
            pad = special["pad_token"] or EOS_TOKEN
            return cls(vocab, merges, pad_token=pad, max_length=_max_length(config), added_tokens=added)
        except (ValueError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{folder}: {e}") from None

    def bpe(self, word: str) -> list[int]:
        """Token ids of one pre-tokenized word (already byte-mapped); short words are cached."""
        if word in self._cache:
            return self._cache[word]
        ids = [self.vocab[s] for s in self._merge(list(word[:-1]) + [word[-1] + "</w>"])]
        if len(word) <= _CACHED_WORD_LENGTH:
            if len(self._cache) >= _CACHE_ENTRIES:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def _merge(self, symbols: list[str]) -> list[str]:
        """BPE: merge every occurrence of the lowest-ranked adjacent pair, left to right, until none is ranked.

        The classic loop rescans the word after each merge (quadratic in its length); here a heap
        holds the ranked pairs by (rank, position) and a linked list the symbols. Pairs that a
        merge creates wait until every occurrence of the current rank is merged, as in the loop.
        """
        ranks, n = self.bpe_ranks, len(symbols)
        after = list(range(1, n + 1))  # the next live symbol (n: none)
        before = list(range(-1, n - 1))  # the previous live symbol (-1: none)
        heap = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
        heapq.heapify(heap)
        while heap:
            rank, created = heap[0][0], []
            while heap and heap[0][0] == rank:
                _, i = heapq.heappop(heap)
                j = after[i]
                if symbols[i] is None or j == n or ranks.get((symbols[i], symbols[j])) != rank:
                    continue  # merged away or changed since it was queued
                symbols[i], symbols[j] = symbols[i] + symbols[j], None
                after[i] = after[j]
                if after[i] < n:
                    before[after[i]] = i
                created += [before[i], i]  # the pairs (previous, merged) and (merged, next)
            for i in created:
                j = after[i] if i >= 0 else n
                if i >= 0 and j < n and symbols[i] is not None and (symbols[i], symbols[j]) in ranks:
                    heapq.heappush(heap, (ranks[symbols[i], symbols[j]], i))
        return [s for s in symbols if s is not None]

    def _words(self, text: str) -> Iterator[str]:
        """The byte-mapped words of a text without special tokens, one at a time."""
        text = unicodedata.normalize("NFC", text)
        text = _WHITESPACE.sub(" ", text)
        # Per character, like the tokenizers Lowercase normalizer (no final-sigma rule).
        text = "".join(c.lower() for c in text)
        for clip_word in _CLIP_WORDS.finditer(text):
            for word in _GPT2_WORDS.findall(clip_word[0]):
                yield "".join(_BYTE_ENCODER[b] for b in word.encode("utf-8"))

    def _content_ids(self, text: str) -> Iterator[list[int]]:
        """The ids of the text, a special token or a word at a time, as far as they are asked for."""
        for i, piece in enumerate(self._special_re.split(text)):
            if i % 2:
                yield [self.special[piece]]
            elif piece:
                yield from map(self.bpe, self._words(piece))

    def tokenize(self, text: str, max_tokens: Optional[int] = None) -> list[int]:
        """BOS + token ids + EOS, not padded.

        With ``max_tokens``, only the first ``max_tokens`` ids between BOS and EOS: the text is read
        no further than they need (``max_length - 1`` is enough to see whether it fits). Without,
        all of them (for prompts split into several chunks of 75).
        """
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"the prompt is {len(text)} characters long; at most {MAX_TEXT_CHARS} are accepted")
        ids = [self.bos]
        for word in self._content_ids(text):
            ids += word
            if max_tokens is not None and len(ids) > max_tokens:
                del ids[max_tokens + 1 :]
                break
        return ids + [self.eos]

    def pad_and_truncate(self, ids: list[int]) -> tuple[list[int], int]:
        """Exactly ``max_length`` ids (BOS, the first content tokens, EOS, then pad); also the count dropped."""
        dropped = max(len(ids) - self.max_length, 0)
        if dropped:
            ids = ids[: self.max_length - 1] + ids[-1:]
        return ids + [self.pad] * (self.max_length - len(ids)), dropped


def _max_length(config: dict) -> int:
    """``model_max_length``; absent, or transformers' "unbounded" marker (1e30), means CLIP's 77 positions."""
    value = config.get("model_max_length", CLIP_CONTEXT)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 2 <= value < 1e20:
        return CLIP_CONTEXT
    return int(value)


def _read_vocab_and_merges(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = _read_json(folder / "vocab.json")
    if not isinstance(vocab, dict):
        raise ModelLoadError(f"{folder / 'vocab.json'}: expected a JSON object of token -> id")
    merges_path = folder / "merges.txt"
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ModelLoadError(f"{merges_path}: missing file") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    if any(len(m) != 2 for m in merges):
        raise ModelLoadError(f"{merges_path}: every line must hold two symbols separated by one space")
    return vocab, merges


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, int]]:
    """The BPE ``model`` section and added tokens of a tokenizers file; merges are "a b" strings or [a, b] pairs."""
    data = _read_json(path)
    model = (data.get("model") if isinstance(data, dict) else None) or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ModelLoadError(f"{path}: not a BPE tokenizer (no model.vocab)")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    if any(len(m) != 2 for m in merges):
        raise ModelLoadError(f"{path}: every merge must hold two symbols")
    added = {t["content"]: t["id"] for t in data.get("added_tokens", []) if isinstance(t, dict) and "content" in t}
    return model["vocab"], merges, added


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing file") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot be read as JSON ({e})") from None
