"""Transformers references for the runtime parity tests: the same prompts through Emu3Processor + generate.

Greedy (`do_sample=False`) everywhere; CFG with an explicit `guidance_scale` (without it Transformers silently
skips CFG) and a negative prompt built the BAAI way (BOS + negative + the same image prefix, left-padded).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=4)
def load(checkpoint: str):
    import torch
    from transformers import AutoProcessor, Emu3ForConditionalGeneration

    torch.manual_seed(0)
    model = Emu3ForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
    return model, processor


def _trim(row, eos: int) -> list[int]:
    row = [int(x) for x in row]
    return row[: row.index(eos) + 1] if eos in row else row


def chat(checkpoint: str, texts: list[str], images: list | None, max_new_tokens: int):
    """texts are final prompt strings (templated or raw, with <image> placeholders)."""
    import torch

    model, processor = load(checkpoint)
    kwargs = {"images": images} if images else {}
    inputs = processor(text=texts, padding=True, return_tensors="pt", **kwargs)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    n = inputs["input_ids"].shape[1]
    eos = model.generation_config.eos_token_id
    full = inputs["input_ids"].clone()
    if images:  # the ids the model sees: placeholders replaced by the VQ codes' tokens (+ EOL per row)
        with torch.no_grad():
            image_ids = model.model.get_image_tokens(inputs["pixel_values"], inputs["image_sizes"])
        full[full == model.vocabulary_mapping.image_token_id] = image_ids.to(full.dtype)
    prompt_ids = [[int(i) for i, m in zip(row, mask) if m] for row, mask in zip(full, inputs["attention_mask"])]
    return prompt_ids, [_trim(row, eos) for row in out[:, n:].tolist()]


def template(checkpoint: str, text: str, n_images: int, system: str | None = None) -> str:
    _, processor = load(checkpoint)
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    messages = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else [])
    return processor.apply_chat_template(messages + [{"role": "user", "content": content}],
                                         add_generation_prompt=True)


def _image_prompt(processor, text: str, ratio: str, area: int) -> tuple[list[int], tuple[int, int]]:
    enc = processor(text=[text], return_for_image_generation=True, ratio=ratio, image_area=area)
    return list(enc["input_ids"][0]), tuple(enc["image_sizes"][0])


def _left_pad(rows: list[list[int]], pad: int):
    import torch

    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    return ids, mask


def text_to_image(checkpoint: str, prompts: list[str], ratios: list[str], area: int,
                  cfg_scale: float | None, negative: str | None):
    """Greedy text-to-image with Emu3's prefix constraint per row; returns prompt ids, tokens, grids, pixels."""
    import torch

    model, processor = load(checkpoint)
    tok = processor.tokenizer
    built = [_image_prompt(processor, p, r, area) for p, r in zip(prompts, ratios)]
    grids = [g for _, g in built]
    ids, mask = _left_pad([b for b, _ in built], tok.pad_token_id)
    visual = torch.tensor(model.vocabulary_mapping.image_tokens)
    eol = model.vocabulary_mapping.eol_token_id
    wrapper, eof, eoi = tok.image_wrapper_token_id, tok.eof_token_id, tok.eoi_token_id
    eos, pad = tok.eos_token_id, tok.pad_token_id

    def allowed(batch_id, input_ids):  # transformers' documented Emu3 prefix function, per-row grid
        h, w = grids[batch_id]
        position = torch.nonzero(input_ids == wrapper, as_tuple=True)[0][0]
        offset = input_ids.shape[0] - position
        if offset % (w + 1) == 0:
            return (eol,)
        if offset == (w + 1) * h + 1:
            return (eof,)
        if offset == (w + 1) * h + 2:
            return (eoi,)
        if offset == (w + 1) * h + 3:
            return (eos,)
        if offset > (w + 1) * h + 3:
            return (pad,)
        return visual

    kwargs = {}
    if cfg_scale is not None:
        neg = [_image_prompt(processor, negative, r, area)[0] for r in ratios]
        neg_ids, neg_mask = _left_pad(neg, pad)
        kwargs = dict(negative_prompt_ids=neg_ids, negative_prompt_attention_mask=neg_mask, guidance_scale=cfg_scale)
    n_new = max(h * (w + 1) + 3 for h, w in grids)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, prefix_allowed_tokens_fn=allowed, do_sample=False,
                             max_new_tokens=n_new, **kwargs)
    tokens = [out[i, ids.shape[1]: ids.shape[1] + h * (w + 1) + 3].tolist() for i, (h, w) in enumerate(grids)]
    pixels = []
    with torch.no_grad():
        for i, (h, w) in enumerate(grids):
            px = model.model.decode_image_tokens(image_tokens=torch.tensor([tokens[i]]), height=h, width=w)
            pixels.append(px[0].float().numpy())
    return [b for b, _ in built], tokens, grids, pixels


def postprocess(checkpoint: str, pixels: np.ndarray):
    _, processor = load(checkpoint)
    return processor.postprocess([pixels], return_tensors="PIL.Image.Image")["pixel_values"][0]
