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
"""

import json
import unicodedata
from pathlib import Path
from typing import Optional

import regex

from .errors import ModelLoadError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CLIP_CONTEXT = 77  # the text encoder's positions

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
        """Token ids of one pre-tokenized word (already byte-mapped), cached."""
        if word in self._cache:
            return self._cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self.vocab[s] for s in symbols]
        self._cache[word] = ids
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        text = unicodedata.normalize("NFC", text)
        text = _WHITESPACE.sub(" ", text)
        # Per character, like the tokenizers Lowercase normalizer (no final-sigma rule).
        text = "".join(c.lower() for c in text)
        ids = []
        for clip_word in _CLIP_WORDS.findall(text):
            for word in _GPT2_WORDS.findall(clip_word):
                ids += self.bpe("".join(_BYTE_ENCODER[b] for b in word.encode("utf-8")))
        return ids

    def tokenize(self, text: str) -> list[int]:
        """BOS + token ids + EOS, neither padded nor truncated."""
        ids = [self.bos]
        for i, piece in enumerate(self._special_re.split(text)):
            if i % 2:
                ids.append(self.special[piece])
            elif piece:
                ids += self._encode_plain(piece)
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
