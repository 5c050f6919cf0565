"""conditioning.PromptEncoder: A1111's chunking, weights, clip skip and embeddings (against the A1111-algorithm
reference in a1111_reference.py, on transformers' CLIP) and today's diffusers path, bit for bit, for plain prompts."""

import functools

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTextModelWithProjection as HFCLIPTextModelWithProjection
from transformers import CLIPTokenizer

import a1111_reference as a1111
from parity import relative_error
from stable_diffusion import model_io
from stable_diffusion.clip import CLIPTextModel
from stable_diffusion.conditioning import PromptEncoder, TextOptions
from stable_diffusion.config import CLIPTextModelConfig
from stable_diffusion.embeddings import Embedding
from stable_diffusion.tokenizer import MAX_TEXT_CHARS, Tokenizer

# The encoder itself is held to 1e-5 relative to transformers in float32 (test_clip.py); here the
# chunks go through it as one batch, and a weighted chunk's values are multiplied by w and by the
# ratio of two means: see emphasis_tolerance for what that ratio adds.
ENCODER_TOLERANCE = 1e-5

PLAIN = "a photo of a cat sitting on a red sofa, soft light"
TAGS = ["masterpiece", "best quality", "(detailed face:1.2)", "[blurry]", "((sharp focus))", "city street at night",
        "neon lights", "(rain:0.8)", "reflections on the wet ground", "cinematic composition"]
LONG = ", ".join(TAGS * 6)  # about 180 tokens with weights and commas: 3 chunks
# 70 tags, a comma at 70, then words: the chunk fills at 75 on "e", and the 4 words after the comma move on.
BACKTRACK = "tag " * 70 + ", a b c d e f g"
EMB = "wombatstyle"


class Models:
    """Our PromptEncoder and the reference's transformers tokenizers and encoders for one tiny model folder."""

    def __init__(self, root, family: str):
        xl = family == "sdxl"
        names = [("tokenizer", "text_encoder")] + ([("tokenizer_2", "text_encoder_2")] if xl else [])
        self.xl, self.family = xl, family
        self.tokenizers = [Tokenizer.from_folder(root / t) for t, _ in names]
        self.encoders = [model_io.load_component(root, e, CLIPTextModel, CLIPTextModelConfig, mx.float32) for _, e in names]
        self.ours = PromptEncoder(self.tokenizers, self.encoders, xl)
        self.hf_tokenizers = [CLIPTokenizer.from_pretrained(root / t) for t, _ in names]
        classes = [HFCLIPTextModel, HFCLIPTextModelWithProjection]
        self.hf_encoders = [cls.from_pretrained(root / e).eval() for cls, (_, e) in zip(classes, names)]

    def reference(self, text, **options):
        if self.xl:
            return a1111.encode_sdxl(self.hf_tokenizers, self.hf_encoders, text, **options)
        return a1111.encode_sd(self.hf_tokenizers[0], self.hf_encoders[0], text, **options), None

    def embedding(self, n_vectors: int, name: str = EMB, seed: int = 0) -> Embedding:
        rng = np.random.default_rng(seed)
        vectors = tuple(rng.standard_normal((n_vectors, e.config.model_dims)).astype(np.float32) for e in self.encoders)
        return Embedding(name, vectors, "0123456789ab", f"{name}.safetensors")


@functools.lru_cache(maxsize=None)
def _models(root, family):
    return Models(root, family)


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def models(request):
    return _models(request.getfixturevalue(f"tiny_{request.param}"), request.param)


@pytest.fixture
def sd1(tiny_sd1):
    return _models(tiny_sd1, "sd1")


def diffusers_path(tokenizer, encoder, text):
    """Today's _Pipeline._encode_text: the text cut to 77 ids, padded with the tokenizer's pad token, one row."""
    ids, _ = tokenizer.pad_and_truncate(tokenizer.tokenize(text, max_tokens=tokenizer.max_length - 1))
    return encoder(mx.array([ids]))


def todays_conditioning(m: Models, text):
    if not m.xl:
        return diffusers_path(m.tokenizers[0], m.encoders[0], text).last_hidden_state, None
    out_1, out_2 = (diffusers_path(t, e, text) for t, e in zip(m.tokenizers, m.encoders))  # as StableDiffusionXL._encode_both
    return mx.concatenate([out_1.hidden_states[-2], out_2.hidden_states[-2]], axis=-1), out_2.text_embeds


def emphasis_tolerance(reference_chunks: torch.Tensor, weights: torch.Tensor) -> float:
    """The relative error "Original" emphasis may show, given the encoder's, from each chunk's values.

    A chunk's output is y = z w r with r = m0 / m1 (the means of z and of z w). The encoder's error,
    at most e = ENCODER_TOLERANCE max|z| per value, moves m0 by at most e and m1 by e max|w|, so r
    by a relative e / |m0| + e max|w| / |m1|; then |dy| <= e max|w| |r| + max|z w| |r| (that relative
    error), and relative to max|y| = max|z w| |r| the bound below. Chunks whose values nearly cancel
    (small means, as in these random tiny encoders) make r sensitive, and the bound follows that.
    Each chunk's bound also holds relative to the whole context's largest value, which is larger.
    """
    tolerance = ENCODER_TOLERANCE
    for z, w in zip(reference_chunks.double(), weights.double()):
        zw, w_max = z * w[:, None], w.abs().max().item()
        e = ENCODER_TOLERANCE * z.abs().max().item()
        bound = e * w_max / zw.abs().max().item() + e / z.mean().abs().item() + e * w_max / zw.mean().abs().item()
        tolerance = max(tolerance, ENCODER_TOLERANCE + bound)  # + float32 rounding, of the encoder's order
    return tolerance


def test_plain_prompt_is_bit_identical_to_todays_path_with_either_syntax(models):
    expected, expected_pooled = todays_conditioning(models, PLAIN)
    for syntax in ("none", "a1111"):
        out = models.ours.encode(PLAIN, TextOptions(syntax=syntax))
        assert out.chunks == 1 and out.dropped == "" and out.embeddings_used == ()
        assert mx.array_equal(out.context, expected), syntax
        if models.xl:
            assert mx.array_equal(out.pooled, expected_pooled), syntax
        else:
            assert out.pooled is None


def test_syntax_none_reads_brackets_and_break_as_text_and_cuts_at_75_tokens(models):
    text = "(a cat:1.5) BREAK " + "dog " * 100
    expected, expected_pooled = todays_conditioning(models, text)
    out = models.ours.encode(text, TextOptions(syntax="none"))
    assert mx.array_equal(out.context, expected)
    if models.xl:
        assert mx.array_equal(out.pooled, expected_pooled)
    total = len(models.tokenizers[0].tokenize(text)) - 2
    assert out.tokens == total and out.chunks == 1
    assert out.dropped == f"the last {total - 75} of {total} tokens (CLIP takes 75)"


@pytest.mark.parametrize("text", [LONG, BACKTRACK, "a cat BREAK a (dog:1.3) BREAK", "BREAK", "", PLAIN + " BREAK " + LONG])
def test_chunks_match_the_a1111_reference(models, text):
    chunks, count, dropped = models.ours.chunks(text, TextOptions())
    assert dropped == ""
    for e, (tokenizer, ours) in enumerate(zip(models.hf_tokenizers, chunks)):
        expected, expected_count = a1111.a1111_chunks(tokenizer, text, encoder=e)
        assert [list(c.tokens) for c in ours] == [c["tokens"] for c in expected]
        assert [list(c.weights) for c in ours] == [c["multipliers"] for c in expected]
        assert all(c.fixes == () for c in ours)
        if e == 0:
            assert count == expected_count


def test_the_long_prompt_fills_three_weighted_chunks_and_the_backtrack_moves_words(sd1):
    # Guards that the cases above exercise what they are named after.
    (chunks,), _, _ = sd1.ours.chunks(LONG, TextOptions())
    assert len(chunks) == 3 and {w for c in chunks for w in c.weights} > {1.0, 1.2}
    ((first, second),), _, _ = sd1.ours.chunks(BACKTRACK, TextOptions())
    tokenizer = sd1.tokenizers[0]
    assert first.tokens[71] == tokenizer.vocab[",</w>"] and set(first.tokens[72:]) == {tokenizer.eos}
    assert second.tokens[1:8] == tuple(tokenizer.tokenize("a b c d e f g")[1:-1])


def test_chunks_pad_with_each_tokenizers_own_id_after_the_first_eos(models):
    pads = {"sd1": [49407], "sd2": [0], "sdxl": [49407, 0]}[models.family]
    chunks, _, _ = models.ours.chunks("a cat", TextOptions())
    for tokenizer, pad, (chunk,) in zip(models.tokenizers, pads, chunks):
        assert chunk.tokens[:4] == (tokenizer.bos, *tokenizer.tokenize("a cat")[1:-1], tokenizer.eos)
        assert set(chunk.tokens[4:]) == {pad}


def test_weighted_prompt_matches_the_reference(models):
    for emphasis in ("Original", "No norm", "None"):
        options = TextOptions(emphasis=emphasis)
        out = models.ours.encode(LONG, options)
        ref, ref_pooled = models.reference(LONG, emphasis=emphasis)
        assert out.context.shape == tuple(ref.shape) == (1, 77 * out.chunks, ref.shape[-1])
        assert relative_error(out.context, ref) <= _tolerance(models, LONG, emphasis), emphasis
        if models.xl:
            assert relative_error(out.pooled, ref_pooled) <= ENCODER_TOLERANCE


def _tolerance(models, text, emphasis, embeddings=(), clip_skip=1):
    """The tolerance for ``text``'s context under ``emphasis``, from the reference's own chunks."""
    if emphasis != "Original":
        return 2 * ENCODER_TOLERANCE  # one product with w in float32 on top of the encoder's error
    extra = {} if models.xl else {"clip_skip": clip_skip}
    weighted, _ = models.reference(text, emphasis="No norm", embeddings=embeddings, **extra)  # z * w, chunk by chunk
    widths = [e.config.model_dims for e in models.encoders]
    tolerance = ENCODER_TOLERANCE
    for e, tokenizer in enumerate(models.hf_tokenizers):
        chunks, _ = a1111.a1111_chunks(tokenizer, text, embeddings=embeddings, encoder=e)
        start = sum(widths[:e])
        zw = weighted[0, :, start : start + widths[e]].reshape(len(chunks), 77, widths[e])
        weights = torch.tensor([c["multipliers"] for c in chunks])
        tolerance = max(tolerance, emphasis_tolerance(zw / weights[..., None], weights))
    return tolerance


# An embedding of 3 vectors after 73 tokens: no room in the first chunk, so it opens the second.
AT_BOUNDARY = "tag " * 73 + EMB + " after it"
# The embedding sits among the words that the comma backtrack moves (A1111 leaves its vectors behind).
IN_BACKTRACK = "tag " * 68 + ", x " + EMB + " y z w v"


@pytest.mark.parametrize("text, fixes", [(AT_BOUNDARY, [(), ((1, 0),)]), (IN_BACKTRACK, [((71, 0),), ()]), ("a " + EMB + ", (" + EMB + ":1.2)", [((2, 0), (6, 0))])])
def test_embedding_chunks_and_vectors_match_the_reference(models, text, fixes):
    embedding = models.embedding(3)
    options = TextOptions(embeddings=(embedding,))
    chunks, _, _ = models.ours.chunks(text, options)
    for e, (tokenizer, ours) in enumerate(zip(models.hf_tokenizers, chunks)):
        expected, _ = a1111.a1111_chunks(tokenizer, text, embeddings=[embedding], encoder=e)
        assert [list(c.tokens) for c in ours] == [c["tokens"] for c in expected]
        assert [list(c.weights) for c in ours] == [c["multipliers"] for c in expected]
        # A1111 stores the offset without BOS; ours is the row position.
        assert [[(p - 1, options.embeddings[i]) for p, i in c.fixes] for c in ours] == [c["fixes"] for c in expected]
        assert [c.fixes for c in ours] == fixes
    out = models.ours.encode(text, options)
    ref, ref_pooled = models.reference(text, embeddings=[embedding])
    assert out.embeddings_used == (EMB,)
    assert relative_error(out.context, ref) <= _tolerance(models, text, "Original", [embedding])
    if models.xl:
        assert relative_error(out.pooled, ref_pooled) <= ENCODER_TOLERANCE


def test_the_longest_embedding_name_wins_and_unused_ones_are_not_listed(sd1):
    # Names that share their first tokens: "wombat" is a prefix of "wombat v2" token for token.
    short, long = sd1.embedding(2, "wombat", seed=1), sd1.embedding(1, "wombat v2", seed=2)
    unused = sd1.embedding(1, "platypus", seed=3)
    options = TextOptions(embeddings=(short, long, unused))
    text = "a wombat v2 and a wombat"
    out = sd1.ours.encode(text, options)
    assert out.embeddings_used == ("wombat v2", "wombat")
    ((chunk,),), _, _ = sd1.ours.chunks(text, options)
    assert chunk.fixes == ((2, 1), (5, 0))
    ref, _ = sd1.reference(text, embeddings=[short, long, unused])
    assert relative_error(out.context, ref) <= ENCODER_TOLERANCE


def test_clip_skip_2_takes_the_normed_penultimate_layer_on_sd1(sd1):
    for text in (PLAIN, LONG):
        out = sd1.ours.encode(text, TextOptions(clip_skip=2))
        ref, _ = sd1.reference(text, clip_skip=2)
        assert relative_error(out.context, ref) <= _tolerance(sd1, text, "Original", clip_skip=2)
    assert not mx.array_equal(out.context, sd1.ours.encode(LONG).context)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_clip_skip_changes_nothing_on_sd2_and_sdxl_as_in_a1111(family, request):
    m = _models(request.getfixturevalue(f"tiny_{family}"), family)
    skipped, plain = m.ours.encode(LONG, TextOptions(clip_skip=2)), m.ours.encode(LONG)
    assert mx.array_equal(skipped.context, plain.context)
    ref, _ = m.reference(LONG)
    assert relative_error(skipped.context, ref) <= _tolerance(m, LONG, "Original")


def test_a_batch_of_scheduled_texts_shares_chunk_count_and_emphasis_mean_as_in_a1111(models):
    # A1111 encodes one prompt's scheduled texts in one batch (prompt editing, alternation).
    texts = ["a (red:1.4) cat", LONG, "a (red:1.4) cat", PLAIN]
    outs = models.ours.encode_batch(texts, TextOptions())
    ref, ref_pooled = models.reference(texts)
    assert [o.chunks for o in outs] == [3] * 4
    tolerance = max(_tolerance(models, t, "Original") for t in (LONG, "a (red:1.4) cat"))
    for i, out in enumerate(outs):
        assert relative_error(out.context, ref[i : i + 1]) <= tolerance, i
        if models.xl:
            assert relative_error(out.pooled, ref_pooled[i : i + 1]) <= ENCODER_TOLERANCE
    alone = models.ours.encode("a (red:1.4) cat")
    assert not np.allclose(np.array(alone.context), np.array(outs[0].context[:, :77]), rtol=1e-3)


def test_the_empty_chunk_is_the_encoded_empty_prompt(models):
    out = models.ours.empty_chunk(TextOptions())
    ref, ref_pooled = models.reference("")
    assert out.chunks == 1 and out.tokens == 0
    assert relative_error(out.context, ref) <= ENCODER_TOLERANCE
    assert mx.array_equal(out.context, todays_conditioning(models, "")[0])


def test_all_chunks_of_a_prompt_go_through_each_encoder_in_one_call(models, monkeypatch):
    calls, original = [], CLIPTextModel.__call__
    monkeypatch.setattr(CLIPTextModel, "__call__", lambda self, ids, *a: calls.append(ids.shape) or original(self, ids, *a))
    models.ours.encode(LONG)
    assert calls == [(3, 77)] * len(models.encoders)


@pytest.mark.parametrize(
    "options, message",
    [
        (TextOptions(syntax="comfy"), "prompt syntax 'comfy'"),
        (TextOptions(emphasis="original"), "emphasis 'original'"),
        (TextOptions(clip_skip=0), "clip_skip=0"),
        (TextOptions(clip_skip=4), "clip_skip=4"),
        (TextOptions(embeddings=("EasyNegative",)), "expected Embedding objects"),
    ],
)
def test_bad_options_raise_one_line(sd1, options, message):
    with pytest.raises(ValueError, match=message) as error:
        sd1.ours.encode("a cat", options)
    assert "\n" not in str(error.value)


def test_an_embedding_for_another_model_is_refused(sd1):
    wrong = Embedding("xl", (np.zeros((1, 768), np.float32), np.zeros((1, 1280), np.float32)), "", "xl.safetensors")
    with pytest.raises(ValueError, match="xl.safetensors"):
        sd1.ours.encode("a cat", TextOptions(embeddings=(wrong,)))


def test_a_text_over_max_text_chars_is_refused_before_parsing(sd1):
    text = "(a:1.1) " * (MAX_TEXT_CHARS // 8 + 1)  # every piece short, the whole too long
    with pytest.raises(ValueError, match=f"at most {MAX_TEXT_CHARS}"):
        sd1.ours.encode(text)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_float16_encoders_give_float16_contexts_close_to_the_float32_reference(family, request):
    root = request.getfixturevalue(f"tiny_{family}")
    m = _models(root, family)
    names = ["text_encoder"] + (["text_encoder_2"] if m.xl else [])
    encoders = [model_io.load_component(root, name, CLIPTextModel, CLIPTextModelConfig, mx.float16) for name in names]
    half = PromptEncoder(m.tokenizers, encoders, m.xl)
    embedding = m.embedding(3)
    for emphasis in ("Original", "No norm"):
        out = half.encode(LONG + ", " + EMB, TextOptions(emphasis=emphasis, embeddings=(embedding,)))
        assert out.context.dtype == mx.float16 and mx.all(mx.isfinite(out.context)).item()
    ref, _ = m.reference(LONG + ", " + EMB, emphasis="No norm", embeddings=[embedding])
    # The float16 encoder is held to 1e-2 of the float32 reference (test_clip.py); w multiplies once more.
    assert relative_error(out.context, ref) <= 2e-2


def test_an_empty_batch_is_refused(sd1):
    with pytest.raises(ValueError, match="no texts"):
        sd1.ours.encode_batch([])
