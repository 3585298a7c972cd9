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


class DecoderStepBuffered(DecoderStep):
    """The decoder step over a preallocated KV buffer: the graph reads the buffer and returns only the new rows.

    input_ids (B, S), attention_mask (B, C + S): C buffer slots (1 = filled) then the S new tokens,
    position_ids (B, S), past K/V per layer (B, KV, C, D): the buffer, filled or not
    -> logits (B, V) f32 of the last position, present K/V per layer (B, KV, S, D): the new tokens' rows only.

    The concat graph copies the whole past into a fresh present tensor on every call (B * 2L * KV * T * D values,
    269 MB per CFG step at 8k context). Here attention is split instead: scores against the buffer and against
    the new keys are concatenated (a (B, H, S, C + S) tensor, not K/V), one softmax, and the two value products
    are summed. The runtime writes the returned rows into its buffer in place. Empty slots carry mask 0 and any
    finite values: their softmax weight is exactly 0. The mask must be C + S wide: the graph reads C from the buffer
    and S from input_ids and does not check the sum (ONNX would broadcast a width-1 mask); the runtime's KVCache
    builds both from one capacity. Layers, norms, rotary embedding and projections are the
    checkpoint's own modules; only attention's cache handling is restated here, and export.verify checks the
    graph against the model's forward.
    """

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.models.emu3.modeling_emu3 import apply_rotary_pos_emb

        tm = self.text_model
        hidden = tm.embed_tokens(input_ids)                                  # (B, S, E)
        cos, sin = tm.rotary_emb(hidden, position_ids=position_ids)
        bias_past, bias_new = self._biases(attention_mask, input_ids.shape[1])
        present = []
        for i, layer in enumerate(tm.layers[: self.num_layers]):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            shape = (*x.shape[:-1], -1, attn.head_dim)                      # (B, S, heads, D)
            q = attn.q_proj(x).view(shape).transpose(1, 2)                  # (B, H, S, D)
            k = attn.k_proj(x).view(shape).transpose(1, 2)                  # (B, KV, S, D)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            out = self._attend(q, k, v, past[2 * i], past[2 * i + 1], bias_past, bias_new, attn.scaling)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            present += [k, v]
        hidden = tm.norm(hidden)
        return (self.lm_head(hidden[:, -1]).float(), *present)

    @staticmethod
    def _biases(mask, s: int):
        """Additive float32 biases: over the buffer (B, 1, 1, 1, C) and causal over the new tokens (B, 1, 1, S, S).

        float32 whatever the model dtype: in fp16, finfo.min plus a score below -16 overflows to -inf, and a
        query row whose keys are all masked (a left-pad token) would turn into NaN, which then reaches the real
        rows through the pad slots' K/V in the next layer. Added to float32 scores, the masked row stays finite.
        """
        low = torch.finfo(torch.float32).min
        keep = mask.bool()
        c = mask.shape[1] - s
        causal = torch.ones(s, s, dtype=torch.bool, device=mask.device).tril()
        new = keep[:, None, c:] & causal                                     # (B, S, S)
        zero = torch.zeros((), dtype=torch.float32)
        bias_past = torch.where(keep[:, :c], zero, low)[:, None, None, None, :]
        bias_new = torch.where(new, zero, low)[:, None, None]
        return bias_past, bias_new

    @staticmethod
    def _attend(q, k, v, past_k, past_v, bias_past, bias_new, scaling):
        """q (B, H, S, D), k/v (B, KV, S, D), buffer (B, KV, C, D) -> (B, S, H * D). Heads share KV in groups of
        G = H / KV (head h reads KV head h // G, as repeat_kv does): q is viewed as (B, KV, G * S, D) so no K/V
        is repeated or copied."""
        b, h, s, d = q.shape
        kv = k.shape[1]
        g = h // kv
        qg = q.reshape(b, kv, g * s, d)
        # scores in the model dtype, masked and normalized in float32 (see _biases)
        scores_past = torch.matmul(qg, past_k.transpose(2, 3)).view(b, kv, g, s, -1).float() * scaling + bias_past
        scores_new = torch.matmul(qg, k.transpose(2, 3)).view(b, kv, g, s, s).float() * scaling + bias_new
        c = past_k.shape[2]
        probs = torch.softmax(torch.cat([scores_past, scores_new], dim=-1), dim=-1).to(q.dtype)
        p_past, p_new = probs[..., :c], probs[..., c:]
        out = torch.matmul(p_past.reshape(b, kv, g * s, c), past_v) + torch.matmul(p_new.reshape(b, kv, g * s, s), v)
        return out.view(b, h, s, d).transpose(1, 2).reshape(b, s, h * d)
