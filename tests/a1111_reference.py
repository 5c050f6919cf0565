"""AUTOMATIC1111's prompt conditioning on transformers' CLIP (torch): the reference for conditioning.py.

Written from the algorithm of A1111's ``modules/sd_hijack_clip.py`` (``tokenize_line``: chunks of
75, the comma backtrack of 20, BREAK, embeddings never split; ``process_tokens``: the pad id after
the first EOS; ``forward``: chunk i of every text in one batch, empty chunks for texts that have
fewer, hidden states joined along the sequence), ``sd_hijack.py`` (``EmbeddingsWithFixes``: the
vectors written over the token embeddings), ``sd_emphasis.py`` and ``textual_inversion.py``
(``find_embedding_at_position``), on transformers' ``CLIPTokenizer`` and ``CLIPTextModel``; it
follows A1111's control flow step by step rather than our module's.

API (all texts are already free of scheduling syntax; weights come from ``parse``, by default our
``prompts.parse_prompt_attention``, which its own tests hold to A1111's doctests):

- ``a1111_chunks(tokenizer, text, emphasis, embeddings, encoder)`` -> (chunks, token_count): each
  chunk a dict of 77 ``tokens`` (pad applied), 77 ``multipliers`` and ``fixes`` [(offset, embedding)],
  offset counted without BOS as A1111 stores it.
- ``encode_sd(tokenizer, text_encoder, text, clip_skip=1, emphasis="Original", embeddings=())``
  -> (1, 77 k, D) float32; ``text`` may be a list (one batch, A1111's prompt-editing call) -> (B, 77 k, D).
- ``encode_sdxl(tokenizers, text_encoders, text, emphasis="Original", embeddings=())``
  -> (context (B, 77 k, D1 + D2), pooled (B, P)).

``embeddings``: objects with ``name`` and ``vectors`` (one (n, dims) array per text encoder), such
as ``stable_diffusion.embeddings.Embedding``.
"""

import torch

CHUNK_LENGTH = 75
COMMA_PADDING_BACKTRACK = 20


def _default_parse(text):
    from stable_diffusion.prompts import parse_prompt_attention

    return parse_prompt_attention(text)


def _ids(tokenizer, texts):
    return tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]


def _embedding_lookup(tokenizer, embeddings):
    """first token id -> [(name ids, embedding)], longest first, as EmbeddingDatabase.register_embedding keeps it."""
    lookup = {}
    for embedding in embeddings:
        ids = _ids(tokenizer, [embedding.name])[0]
        if ids:
            lookup[ids[0]] = sorted(lookup.get(ids[0], []) + [(ids, embedding)], key=lambda x: len(x[0]), reverse=True)
    return lookup


def _find_embedding(lookup, tokens, offset):
    for ids, embedding in lookup.get(tokens[offset], []):
        if tokens[offset : offset + len(ids)] == ids:
            return embedding, len(ids)
    return None, None


def a1111_chunks(tokenizer, text, emphasis="Original", embeddings=(), encoder=0, parse=_default_parse):
    id_start, id_end = tokenizer.bos_token_id, tokenizer.eos_token_id
    id_pad = tokenizer.pad_token_id
    comma_token = tokenizer.get_vocab().get(",</w>")
    lookup = _embedding_lookup(tokenizer, embeddings)

    parsed = parse(text) if emphasis != "None" else [[text, 1.0]]
    tokenized = _ids(tokenizer, [piece for piece, _ in parsed])

    chunks = []
    chunk = {"tokens": [], "multipliers": [], "fixes": []}
    token_count = 0
    last_comma = -1

    def next_chunk(is_last=False):
        nonlocal token_count, last_comma, chunk
        token_count += len(chunk["tokens"]) if is_last else CHUNK_LENGTH
        to_add = CHUNK_LENGTH - len(chunk["tokens"])
        if to_add > 0:
            chunk["tokens"] += [id_end] * to_add
            chunk["multipliers"] += [1.0] * to_add
        chunk["tokens"] = [id_start] + chunk["tokens"] + [id_end]
        chunk["multipliers"] = [1.0] + chunk["multipliers"] + [1.0]
        last_comma = -1
        chunks.append(chunk)
        chunk = {"tokens": [], "multipliers": [], "fixes": []}

    for tokens, (piece, weight) in zip(tokenized, parsed):
        if piece == "BREAK" and weight == -1:
            next_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma_token:
                last_comma = len(chunk["tokens"])
            elif len(chunk["tokens"]) == CHUNK_LENGTH and last_comma != -1 and len(chunk["tokens"]) - last_comma <= COMMA_PADDING_BACKTRACK:
                break_location = last_comma + 1
                reloc_tokens = chunk["tokens"][break_location:]
                reloc_mults = chunk["multipliers"][break_location:]
                chunk["tokens"] = chunk["tokens"][:break_location]
                chunk["multipliers"] = chunk["multipliers"][:break_location]
                next_chunk()
                chunk["tokens"] = reloc_tokens
                chunk["multipliers"] = reloc_mults
            if len(chunk["tokens"]) == CHUNK_LENGTH:
                next_chunk()
            embedding, name_length = _find_embedding(lookup, tokens, position)
            if embedding is None:
                chunk["tokens"].append(token)
                chunk["multipliers"].append(weight)
                position += 1
                continue
            emb_len = len(embedding.vectors[encoder])
            if len(chunk["tokens"]) + emb_len > CHUNK_LENGTH:
                next_chunk()
            chunk["fixes"].append((len(chunk["tokens"]), embedding))
            chunk["tokens"] += [0] * emb_len
            chunk["multipliers"] += [weight] * emb_len
            position += name_length

    if chunk["tokens"] or not chunks:
        next_chunk(is_last=True)

    # process_tokens: SD 2's OpenCLIP pads with 0 after the first end-of-text token.
    for c in chunks:
        first_end = c["tokens"].index(id_end)
        c["tokens"] = c["tokens"][: first_end + 1] + [id_pad] * (len(c["tokens"]) - first_end - 1)
    return chunks, token_count


def _empty_chunk(tokenizer):
    return a1111_chunks(tokenizer, "", parse=lambda text: [[text, 1.0]])[0][0]


def _text_model(model):
    """The transformer holding embeddings and final_layer_norm: transformers 5's CLIPTextModel is it, the projection model wraps it."""
    return getattr(model, "text_model", model)


def _encode_chunk_batch(text_encoder, batch, encoder, layer):
    """One batch of chunks (chunk i of every text) through transformers, vectors written as EmbeddingsWithFixes does."""
    tokens = torch.tensor([c["tokens"] for c in batch])

    def write_vectors(module, inputs, output):
        rows = []
        for c, tensor in zip(batch, output):
            for offset, embedding in c["fixes"]:
                emb = torch.from_numpy(embedding.vectors[encoder]).to(tensor.dtype)
                emb_len = min(tensor.shape[0] - offset - 1, emb.shape[0])
                tensor = torch.cat([tensor[0 : offset + 1], emb[0:emb_len], tensor[offset + 1 + emb_len :]])
            rows.append(tensor)
        return torch.stack(rows)

    hook = _text_model(text_encoder).embeddings.token_embedding.register_forward_hook(write_vectors)
    try:
        with torch.no_grad():
            outputs = text_encoder(input_ids=tokens, output_hidden_states=True)
    finally:
        hook.remove()
    return layer(text_encoder, outputs), getattr(outputs, "text_embeds", None)


def _emphasize(z, multipliers, emphasis):
    if emphasis not in ("Original", "No norm"):
        return z
    original_mean = z.mean()
    z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    if emphasis == "Original":
        z = z * (original_mean / z.mean())
    return z


def _forward(tokenizer, text_encoder, texts, layer, emphasis, embeddings, encoder, parse):
    """A1111's forward over a list of texts: (B, 77 k, D) and the first chunk's pooled output."""
    batch_chunks = [a1111_chunks(tokenizer, text, emphasis, embeddings, encoder, parse)[0] for text in texts]
    chunk_count = max(len(chunks) for chunks in batch_chunks)
    zs, pooled = [], None
    for i in range(chunk_count):
        batch = [chunks[i] if i < len(chunks) else _empty_chunk(tokenizer) for chunks in batch_chunks]
        z, text_embeds = _encode_chunk_batch(text_encoder, batch, encoder, layer)
        z = _emphasize(z, torch.tensor([c["multipliers"] for c in batch]), emphasis)
        if i == 0:
            pooled = text_embeds
        zs.append(z)
    return torch.hstack(zs), pooled


def _as_list(text):
    return [text] if isinstance(text, str) else list(text)


def encode_sd(tokenizer, text_encoder, text, clip_skip=1, emphasis="Original", embeddings=(), parse=_default_parse):
    """SD 1.x's FrozenCLIPEmbedderWithCustomWords (clip skip: final_layer_norm(hidden_states[-N]))."""

    def layer(model, outputs):
        if clip_skip > 1:
            return _text_model(model).final_layer_norm(outputs.hidden_states[-clip_skip])
        return outputs.last_hidden_state

    return _forward(tokenizer, text_encoder, _as_list(text), layer, emphasis, embeddings, 0, parse)[0]


def encode_sdxl(tokenizers, text_encoders, text, emphasis="Original", embeddings=(), parse=_default_parse):
    """SDXL: each encoder chunks and weights on its own (penultimate layer, no final norm); pooled from encoder 2's first chunk, unweighted."""
    penultimate = lambda model, outputs: outputs.hidden_states[-2]  # noqa: E731
    texts = _as_list(text)
    z1, _ = _forward(tokenizers[0], text_encoders[0], texts, penultimate, emphasis, embeddings, 0, parse)
    z2, pooled = _forward(tokenizers[1], text_encoders[1], texts, penultimate, emphasis, embeddings, 1, parse)
    return torch.cat([z1, z2], dim=-1), pooled
