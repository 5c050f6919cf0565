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

import regex

from .model_io import ModelLoadError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

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
        max_length: int = 77,
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
        # Special tokens are matched in the raw text, longest first. SD 2's pad token is "!",
        # so there every "!" in a prompt becomes the pad id, as it does in transformers.
        self.special = {t: vocab[t] for t in (BOS_TOKEN, EOS_TOKEN, pad_token)}
        alternatives = sorted(self.special, key=len, reverse=True)
        self._special_re = regex.compile("(" + "|".join(regex.escape(t) for t in alternatives) + ")")
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        """Read a diffusers ``tokenizer/`` folder: vocab.json, merges.txt and the special-token files."""
        folder = Path(folder)
        vocab = _read_json(folder / "vocab.json")
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

        config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        pad_token = config.get("pad_token")
        if pad_token is None and (folder / "special_tokens_map.json").is_file():
            pad_token = _read_json(folder / "special_tokens_map.json").get("pad_token")
        if isinstance(pad_token, dict):
            pad_token = pad_token["content"]
        pad_token = pad_token or EOS_TOKEN
        max_length = config.get("model_max_length", 77)
        try:
            return cls(vocab, merges, pad_token=pad_token, max_length=int(max_length))
        except ValueError as e:
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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing file") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot be read as JSON ({e})") from None
