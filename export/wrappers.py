"""nn.Modules with flat, named I/O around a Transformers Emu3 model: the three graphs of a bundle.

VQEncoder    pixel_values (B, 3, H, W) f32 in [-1, 1]      -> codes (B, H/8, W/8) i64
VQDecoder    codes (B, h, w) i64                            -> pixel_values (B, 3, 8h, 8w) f32
DecoderStep  input_ids (B, S), attention_mask (B, P+S), position_ids (B, S), past K/V (B, KV, P, D) per layer
             -> logits (B, V) f32 of the last position, present K/V (B, KV, P+S, D) per layer

The VQ wrappers call the checkpoint's own submodules and only reorder the work:
* an image is 4 identical frames, so the 2D encoder runs once and its output is tiled before the temporal convs;
* the decoder's temporal convs pad only in front and its 2D part is per frame, so output frame 0 (the image)
  depends on frame 0 alone: only that frame goes through the 2D decoder (4x less work). The temporal stack
  runs on z and quant separately rather than on their batch concatenation, which would make the dynamo
  exporter freeze the batch dim (export-notes 4a).
Both are checked against `vqmodel.encode` / `decode_image_tokens` by `export.verify`.
"""

from __future__ import annotations

import torch
from torch import nn


class VQEncoder(nn.Module):
    def __init__(self, vqmodel):
        super().__init__()
        self.vq = vqmodel
        self.temporal = vqmodel.config.temporal_downsample_factor

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        enc = self.vq.encoder
        x = pixel_values.to(self.vq.dtype)
        # 2D part, once per image: (B, 3, H, W) -> (B, C, h, w)
        h = enc.conv_in(x)
        h = enc.down_block(h)
        h = enc.middle_block(h)
        h = enc.norm_out(h)
        h = h * torch.sigmoid(h)
        h = enc.conv_out(h)
        # tile to the temporal factor: (B, C, T, h, w), as encode() repeats the image T times
        h = h.unsqueeze(2).expand(-1, -1, self.temporal, -1, -1)
        for conv in enc.time_conv:
            h = conv(h)
            h = h * torch.sigmoid(h)
        for layer in enc.time_res_stack:
            h = layer(h)
        h = self.vq.quant_conv(h)                      # (B, C, T', h, w)
        codes = self.vq.quantize(h.permute(0, 2, 1, 3, 4))  # (B, T', h, w)
        return codes[:, 0]


class VQDecoder(nn.Module):
    def __init__(self, vqmodel):
        super().__init__()
        self.vq = vqmodel

    def _temporal(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T', h, w) -> frame 0 after the temporal up-stack: (B, C, h, w)."""
        dec = self.vq.decoder
        for layer in dec.time_res_stack:
            x = layer(x)
        for layer in dec.time_conv:
            x = layer(x)
            x = x * torch.sigmoid(x)
        return x[:, :, 0]

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        dec = self.vq.decoder
        quant = self.vq.quantize.embedding(codes)             # (B, h, w, E)
        quant = quant.permute(0, 3, 1, 2).unsqueeze(2)        # (B, E, 1, h, w)
        post = self.vq.post_quant_conv(quant)
        hidden = self._temporal(post)
        zq = self._temporal(quant)
        hidden = dec.conv_in(hidden)
        hidden = dec.middle_block(hidden, zq)
        hidden = dec.up_block(hidden, zq)
        hidden = dec.norm_out(hidden, zq)
        hidden = hidden * torch.sigmoid(hidden)
        return dec.conv_out(hidden).float()


class DecoderStep(nn.Module):
    """One graph for prefill (P = 0), chunked prefill and decode, with an explicit per-layer KV cache.

    head_ids: keep only these rows of lm_head (the visual-only head for image generation): logits (B, len(ids)),
    column j scoring vocabulary id head_ids[j].
    """

    def __init__(self, model, head_ids: list[int] | None = None):
        super().__init__()
        self.text_model = model.model.text_model
        self.lm_head = model.lm_head
        if head_ids is not None:
            weight = model.lm_head.weight.detach()[torch.as_tensor(head_ids)]
            self.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
            self.lm_head.weight.data.copy_(weight)
        self.num_layers = model.config.text_config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.text_model.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=cache, use_cache=True)
        logits = self.lm_head(out.last_hidden_state[:, -1]).float()
        present = []
        for layer in cache.layers[: self.num_layers]:
            present += [layer.keys, layer.values]
        return (logits, *present)
