"""The KV buffer owner on the embedded tiny bundle (numpy + onnxruntime only, no torch)."""

from __future__ import annotations

import numpy as np
import pytest

import emu3_rt
from emu3_rt import kv_cache
from emu3_rt.bundle import load_bundle
from emu3_rt.kv_cache import KVCache

from .conftest import TINY_BUNDLE


def test_buffer_grows_in_blocks_and_keeps_rows(monkeypatch):
    monkeypatch.setattr(kv_cache, "KV_BLOCK", 4)
    bundle = load_bundle(TINY_BUNDLE)
    assert bundle.kv_cache == "buffer"
    cache = KVCache(bundle, rows=2)
    kv, d = bundle.manifest["model"]["decoder"]["num_key_value_heads"], bundle.manifest["model"]["decoder"]["head_size"]
    rng = np.random.default_rng(0)
    written = []
    for s in (3, 1, 1, 6):  # 3 -> cap 4, 4 -> 4, 5 -> 8, 11 -> 12
        ids = np.zeros((2, s), np.int64)
        mask = np.ones((2, s), np.int64)
        mask[1, 0] = 0 if cache.length == 0 else 1          # row 1 left-padded by one
        feeds = cache.feeds(ids, mask, np.zeros((2, s), np.int64))
        cap = cache.capacity
        assert cap % 4 == 0 and cap >= cache.length + s
        assert feeds["attention_mask"].shape == (2, cap + s)
        assert feeds["past_key_values.0.key"].shape == (2, kv, cap, d)
        new = {name: rng.standard_normal((2, kv, s, d)).astype(np.float32) for name in cache.present_names}
        written.append(new["present.1.value"])
        cache.advance(new, mask, np.arange(s)[None].repeat(2, 0) + cache.length)
    assert cache.length == 11 and cache.capacity == 12
    np.testing.assert_array_equal(cache.past[3][:, :, :11], np.concatenate(written, axis=2))
    assert (cache.past[3][:, :, 11:] == 0).all()
    assert cache.slot_mask.tolist() == [[1] * 11 + [0], [0] + [1] * 10 + [0]]
    assert cache.next_positions.tolist() == [11, 11]


def test_block_size_does_not_change_tokens(monkeypatch):
    """Empty buffer slots are invisible: sampled tokens are the same whether the buffer grows every 3 positions
    (with empty slots in most steps) or once."""
    model = emu3_rt.load(TINY_BUNDLE)
    base = model.generate_image(["a red cat", "a dog"], ratio=["1:1", "3:4"], seed=3).tokens
    monkeypatch.setattr(kv_cache, "KV_BLOCK", 3)
    assert model.generate_image(["a red cat", "a dog"], ratio=["1:1", "3:4"], seed=3).tokens == base


def test_unknown_layout_is_refused(bundle_copy):
    import json

    path = bundle_copy / "bundle.json"
    manifest = json.loads(path.read_text())
    manifest["model"]["decoder"]["kv_cache"] = "paged"
    path.write_text(json.dumps(manifest))
    with pytest.raises(emu3_rt.BundleError, match=r"'model.decoder.kv_cache' must be one of"):
        load_bundle(bundle_copy)


def test_trt_profiles_cover_every_buffer_capacity():
    """The TensorRT plans' shape profiles admit every buffer the runtime can pass, up to the context length."""
    import json

    from emu3_rt.kv_cache import KV_BLOCK
    from export.build_trt import _profiles

    manifest = json.loads((TINY_BUNDLE / "bundle.json").read_text())
    ctx = manifest["model"]["context_length"]
    prefill, decode = _profiles(manifest, "decoder", max_batch=2, max_side=128)
    largest = -(-ctx // KV_BLOCK) * KV_BLOCK          # the capacity that holds a full context
    for profile, seq in ((prefill, manifest["search"]["prefill_chunk"]), (decode, 1)):
        (_, _, top), (_, _, mask_top) = profile["past_key_values.0.key"], profile["attention_mask"]
        assert top[2] >= largest and mask_top[1] == top[2] + seq
        assert profile["input_ids"][2] == (2, seq)
    assert decode["past_key_values.0.key"][0][2] <= KV_BLOCK  # the smallest buffer the runtime makes


def test_host_capacity_blocks_grow_with_the_length():
    """Small blocks while the cache is short (few empty slots for attention to read), KV_BLOCK once it is long;
    capacities only grow, always hold what is needed, and never pass the KV_BLOCK multiple (TensorRT profiles)."""
    from emu3_rt.kv_cache import KV_BLOCK, capacity_for

    assert [capacity_for(n) for n in (1, 33, 300, 511, 512, 1000, 1500, 2048, 4097)] == \
        [32, 64, 320, 512, 512, 1024, 1536, 2048, 4352]
    caps = [capacity_for(n) for n in range(1, 9000)]
    assert all(c >= n for n, c in zip(range(1, 9000), caps)) and caps == sorted(caps)
    assert all(c <= -(-n // KV_BLOCK) * KV_BLOCK for n, c in zip(range(1, 9000), caps))
