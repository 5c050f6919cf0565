"""The CLIP tokenizer against transformers' CLIPTokenizer built on the same real CLIP vocabulary."""

import copy
import json
import random
import shutil
import time

import pytest
import tiny_models

from stable_diffusion.errors import ModelLoadError
from stable_diffusion.tokenizer import MAX_TEXT_CHARS, Tokenizer

LONG_PROMPT = ", ".join(["a highly detailed matte painting of a castle on a hill at sunset"] * 8)

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A Photograph Of An ASTRONAUT riding a HoRsE",
    "Hello, world!!! What?!... (masterpiece:1.2), [[best quality]] {x|y} #art @user ~~~",
    "1234567 3.14 2024-01-01 10,000 1st 4k 8K 0.5x",
    "don't I'M we'll they're you've she'd it's Ain'T",
    "''quoted'' 'single' `tick` \"double\"",
    "café naïve Ångström façade jalapeño Straße ÆØÅ",
    "cafe\u0301 e\u0301te\u0301 (decomposed accents)",
    "ΟΔΟΣ Σίσυφος İstanbul ǅ",
    "東京の夜景、猫が寝ている 한국어 中文字符",
    "a cat 😀👍🏽 👨\u200d👩\u200d👧 🇫🇷 ❤️ ★",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n\n and    runs\u00a0nbsp\u3000ideographic\u2003em\u200bzwsp",
    "<b>bold</b> &amp; <br/> <div class=\"x\">html</div> a <|endoftext|> b",
    "x<|startoftext|>y <|ENDOFTEXT|> <|StartOfText|>'d",
    "ﬁne ＦＵＬＬＷＩＤＴＨ ² ½ ٣ Ⅻ",
    "supercalifragilisticexpialidocious aaaaaaaaaaaaaaaaaaaaaaa",
    LONG_PROMPT,
    "",
    "   \t\n ",
]


def _read_merges(folder):
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    return [tuple(line.split(" ")) for line in lines if line]


@pytest.fixture(scope="module")
def reference(clip_vocab_dir):
    return tiny_models.clip_tokenizer(clip_vocab_dir)


@pytest.fixture(scope="module")
def ours(clip_vocab_dir):
    vocab = json.loads((clip_vocab_dir / "vocab.json").read_text(encoding="utf-8"))
    return Tokenizer(vocab, _read_merges(clip_vocab_dir))


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_tokenizer_ids_equal_clip_tokenizer(ours, reference, prompt):
    assert ours.tokenize(prompt) == reference(prompt).input_ids


def test_tokenizer_ids_equal_clip_tokenizer_on_random_mixed_text(ours, reference):
    pool = list("abcXYZ019'!?.,-_:;()[]<>|/\\\"#&*  \t\n\u00a0\u3000") + [
        "é", "e\u0301", "Σ", "ß", "İ", "日本", "😀", "👍🏽", "'s", "'LL", "don't", "<|endoftext|>",
        "<|ENDOFTEXT|>", "photo", "render", "lllll", "aaaaaaaa", "ｆｕｌｌ",
    ]
    rng = random.Random(0)
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 25))) for _ in range(2000)]
    expected = reference(texts).input_ids
    mismatches = [t for t, e in zip(texts, expected) if ours.tokenize(t) != e]
    assert mismatches == []


def test_tokenizer_starts_with_bos_and_ends_with_eos(ours, reference):
    assert (ours.bos, ours.eos) == (reference.bos_token_id, reference.eos_token_id) == (49406, 49407)
    assert ours.tokenize("") == [49406, 49407]


@pytest.mark.parametrize("flavour", ["tiny_sd1", "tiny_sd2"])
def test_pad_and_truncate_equals_padding_max_length_with_the_models_pad_token(request, flavour):
    from transformers import CLIPTokenizer

    folder = request.getfixturevalue(flavour) / "tokenizer"
    ours = Tokenizer.from_folder(folder)
    reference = CLIPTokenizer.from_pretrained(folder)
    # SD 1 pads with <|endoftext|>, SD 2 with "!" (id 0).
    assert ours.pad == reference.pad_token_id == (49407 if flavour == "tiny_sd1" else 0)
    assert ours.max_length == reference.model_max_length == 77
    for prompt in PROMPTS + ["wow! so bright!!", "!"]:
        ids, _ = ours.pad_and_truncate(ours.tokenize(prompt))
        expected = reference(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert ids == expected, prompt


def test_sd2_pad_token_exclamation_mark_is_a_special_token_in_prompts(tiny_sd2):
    from transformers import CLIPTokenizer

    folder = tiny_sd2 / "tokenizer"
    ours = Tokenizer.from_folder(folder)
    reference = CLIPTokenizer.from_pretrained(folder)
    for prompt in ["hello!", "wow!!! amazing", "a!b", "!?!"]:
        assert ours.tokenize(prompt) == reference(prompt).input_ids
    # transformers cuts special tokens out of the text first, so SD 2 reads "!" as the pad id.
    assert ours.tokenize("hello!")[-2] == ours.pad == 0


def test_pad_and_truncate_drops_content_tokens_beyond_max_length_and_counts_them(tiny_sd1):
    from transformers import CLIPTokenizer

    folder = tiny_sd1 / "tokenizer"
    ours = Tokenizer.from_folder(folder)
    reference = CLIPTokenizer.from_pretrained(folder)
    full = reference(LONG_PROMPT).input_ids
    assert len(full) > 77
    ids, dropped = ours.pad_and_truncate(ours.tokenize(LONG_PROMPT))
    assert ids == reference(LONG_PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids[0] == 49406 and ids[-1] == 49407
    assert dropped == len(full) - 77
    assert ours.pad_and_truncate(ours.tokenize("a short prompt"))[1] == 0
    exactly_77 = ours.tokenize(" ".join(["cat"] * 75))
    assert len(exactly_77) == 77 and ours.pad_and_truncate(exactly_77) == (exactly_77, 0)


@pytest.mark.parametrize(
    "files",
    [
        {"tokenizer_config.json": {"pad_token": {"__type": "AddedToken", "content": "!", "lstrip": False, "normalized": False}}},
        {"tokenizer_config.json": {"model_max_length": 77}, "special_tokens_map.json": {"pad_token": "!"}},
        {"special_tokens_map.json": {"pad_token": {"content": "!"}}},
        {},
    ],
    ids=["config-dict", "special-tokens-map", "special-tokens-map-dict", "none"],
)
def test_from_folder_reads_the_pad_token_like_transformers(tmp_path, clip_vocab_dir, files):
    from transformers import CLIPTokenizer

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(clip_vocab_dir / name, tmp_path / name)
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    reference = CLIPTokenizer.from_pretrained(tmp_path)
    assert Tokenizer.from_folder(tmp_path).pad == reference.pad_token_id


def _added(content, normalized=True, **extra):
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False, **extra}


# The Hub's SD 2.1 / 2.1-base tokenizer/ files (values verbatim): the two files disagree on the pad token.
SD2_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": {"__type": "AddedToken", **_added("<|startoftext|>")},
    "do_lower_case": True,
    "eos_token": {"__type": "AddedToken", **_added("<|endoftext|>")},
    "errors": "replace",
    "model_max_length": 77,
    "name_or_path": "stabilityai/stable-diffusion-2",
    "pad_token": "<|endoftext|>",
    "special_tokens_map_file": "./special_tokens_map.json",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": {"__type": "AddedToken", **_added("<|endoftext|>")},
}
SD2_SPECIAL_TOKENS_MAP = {
    "bos_token": _added("<|startoftext|>"),
    "eos_token": _added("<|endoftext|>"),
    "pad_token": "!",
    "unk_token": _added("<|endoftext|>"),
}
# sdxl-turbo's tokenizer_2/ (values verbatim): the newer format, whose added_tokens_decoder makes
# transformers ignore special_tokens_map.json.
SDXL_TURBO_TOKENIZER_2_CONFIG = {
    "add_prefix_space": False,
    "added_tokens_decoder": {
        "0": _added("!", normalized=False, special=True),
        "49406": _added("<|startoftext|>", special=True),
        "49407": _added("<|endoftext|>", special=True),
    },
    "bos_token": "<|startoftext|>",
    "clean_up_tokenization_spaces": True,
    "do_lower_case": True,
    "eos_token": "<|endoftext|>",
    "errors": "replace",
    "model_max_length": 77,
    "pad_token": "!",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": "<|endoftext|>",
}


@pytest.mark.parametrize(
    "files",
    [
        {"tokenizer_config.json": SD2_TOKENIZER_CONFIG, "special_tokens_map.json": SD2_SPECIAL_TOKENS_MAP},
        {"tokenizer_config.json": SDXL_TURBO_TOKENIZER_2_CONFIG, "special_tokens_map.json": SD2_SPECIAL_TOKENS_MAP},
        {
            "tokenizer_config.json": SDXL_TURBO_TOKENIZER_2_CONFIG | {"pad_token": "<|endoftext|>"},
            "special_tokens_map.json": SD2_SPECIAL_TOKENS_MAP,
        },
        {"tokenizer_config.json": SD2_TOKENIZER_CONFIG | {"model_max_length": 1000000000000000019884624838656}},
    ],
    ids=["sd2-real-files", "sdxl-turbo-tokenizer-2-real-files", "new-format-ignores-special-tokens-map", "unbounded-max-length"],
)
def test_from_folder_on_real_hub_tokenizer_files_pads_like_transformers(tmp_path, clip_vocab_dir, files):
    from transformers import CLIPTokenizer

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(clip_vocab_dir / name, tmp_path / name)
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    reference = CLIPTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_folder(tmp_path)
    for text in ("a red car!", "", "wow!! <|endoftext|> ok"):
        ids, _ = ours.pad_and_truncate(ours.tokenize(text))
        assert ids == reference(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours.max_length == 77


@pytest.mark.parametrize("pad_token", ["!", "<|endoftext|>"])
def test_from_folder_reads_a_tokenizer_json_only_folder_as_transformers_5_saves_it(tmp_path, clip_vocab_dir, pad_token):
    from transformers import CLIPTokenizer

    tiny_models.clip_tokenizer(clip_vocab_dir, pad_token=pad_token).save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.json").exists() and (tmp_path / "tokenizer.json").exists()
    reference = CLIPTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_folder(tmp_path)
    rng = random.Random(3)
    words = ["cat", "Über", "naïve", "!!", "photo,", "4k", "日本", "<|endoftext|>", "don't", "  "]
    for _ in range(50):
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(1, 30)))
        ids, _ = ours.pad_and_truncate(ours.tokenize(text))
        assert ids == reference(text, padding="max_length", max_length=77, truncation=True).input_ids, text


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt"])
def test_from_folder_with_a_missing_file_raises_model_load_error_naming_it(tmp_path, clip_vocab_dir, missing):
    for name in ("vocab.json", "merges.txt"):
        if name != missing:
            shutil.copy(clip_vocab_dir / name, tmp_path / name)
    with pytest.raises(ModelLoadError, match=missing):
        Tokenizer.from_folder(tmp_path)


# ---------------------------------------------------------------------------------------------
# Hostile text (issue 23.3): bounded work, the same ids


def _long_words():
    rng = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    yield "".join(rng.choice(letters) for _ in range(3000))  # random letters: many short merges
    yield "a" * 2999  # one pair everywhere: overlapping occurrences of every merge
    yield "ab" * 1500 + "lllll" * 300
    yield ("photograph" * 300)[:2999]  # merges up to whole vocabulary words, repeated
    yield "".join(rng.choice("éßΣ日本😀") for _ in range(1000))  # multi-byte characters: byte-level merges
    yield "ｆｕｌｌ" * 700


@pytest.mark.parametrize("word", list(_long_words()), ids=["random", "a_run", "ab_l", "photograph", "multibyte", "fullwidth"])
def test_long_words_give_the_ids_of_clip_tokenizer(ours, reference, word):
    assert ours.tokenize(word) == reference(word).input_ids
    assert ours.tokenize(f"a {word}, b") == reference(f"a {word}, b").input_ids


def test_the_longest_accepted_word_is_tokenized_in_bounded_time(ours):
    # The classic BPE loop rescans the word after each merge: 138 s for 100 KB (issue 23). The heap
    # is n log n: well under a second here; 30 s bounds it on any CPU without passing a quadratic one.
    word = "".join(random.Random(2).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(MAX_TEXT_CHARS))
    start = time.perf_counter()
    ids = ours.tokenize(word)
    assert time.perf_counter() - start < 30
    assert ids[0] == ours.bos and ids[-1] == ours.eos and len(ids) > 1000


def test_a_text_over_the_limit_is_refused_in_one_line(ours):
    with pytest.raises(ValueError, match=rf"the prompt is {MAX_TEXT_CHARS + 1} characters long; at most {MAX_TEXT_CHARS} are accepted") as info:
        ours.tokenize("x" * (MAX_TEXT_CHARS + 1))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("prompt", [LONG_PROMPT, "a " * 200, "x" * 3000, LONG_PROMPT + " <|endoftext|> tail", "!" * 500])
def test_tokenizing_up_to_the_context_gives_clip_tokenizers_truncation(tiny_sd2, prompt):
    from transformers import CLIPTokenizer

    folder = tiny_sd2 / "tokenizer"  # pads with "!": a special token inside the text too
    ours = Tokenizer.from_folder(folder)
    reference = CLIPTokenizer.from_pretrained(folder)
    ids, dropped = ours.pad_and_truncate(ours.tokenize(prompt, max_tokens=ours.max_length - 1))
    assert ids == reference(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert dropped == (len(reference(prompt).input_ids) > 77)  # one beyond the context says it was cut
    full = reference(prompt).input_ids
    assert ours.tokenize(prompt, max_tokens=10) == full[:11] + [ours.eos]


def test_tokenizing_up_to_the_context_reads_no_further_than_it_needs(ours):
    words, counting = [], copy.copy(ours)
    counting.bpe = lambda word: words.append(word) or ours.bpe(word)  # count the words merged
    counting.tokenize("cat " * 20_000, max_tokens=76)
    assert len(words) == 76  # one token per "cat": the 19,924 words after the context are never merged
