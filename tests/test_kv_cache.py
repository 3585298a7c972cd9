"""KV capacities and layouts on the embedded tiny bundle (numpy + onnxruntime only, no torch)."""

from __future__ import annotations

import numpy as np
import pytest

import emu3_rt
from emu3_rt import kv_cache
from emu3_rt.bundle import load_bundle
from emu3_rt.engines import OrtEngine
from emu3_rt.kv_cache import new_state

from .conftest import TINY_BUNDLE


def test_buffer_grows_in_blocks_and_keeps_rows(monkeypatch):
    """The decode state's capacity grows by capacity_for (blocks of KV_BLOCK at most), keeping every row's slots and
    mask (row 1 left-padded by one), and the mask input covers capacity + new columns."""
    monkeypatch.setattr(kv_cache, "KV_BLOCK", 4)
    bundle = load_bundle(TINY_BUNDLE)
    assert bundle.kv_cache == "buffer"
    engine = OrtEngine(bundle.decoder)
    state = new_state(engine, bundle, 2)
    for s in (3, 1, 1, 6):  # 3 -> cap 4, 4 -> 4, 5 -> 8, 11 -> 12
        ids = np.full((2, s), 5, np.int64)
        mask = np.ones((2, s), np.int64)
        mask[1, 0] = 0 if state.length == 0 else 1          # row 1 left-padded by one
        state.step(engine, ids, mask, np.arange(s)[None].repeat(2, 0) + state.length)
        cap = state.capacity
        assert cap % 4 == 0 and cap >= state.length
        io = state._ios[s]
        assert io.mask.shape == (2, cap + s) and state.kv[0].shape[2] == cap
    assert state.length == 11 and state.capacity == 12
    assert state.slot_mask.tolist() == [[1] * 11 + [0], [0] + [1] * 10 + [0]]
    assert state.next_positions.tolist() == [11, 11]
    kv = state.memory.host_view(state.kv[3])
    assert np.isfinite(kv).all() and (kv[:, :, 11:] == 0).all() and (kv[:, :, :11] != 0).any()


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


@pytest.mark.parametrize("max_batch", [1, 2, 3])
def test_trt_profiles_are_valid_for_every_max_batch(max_batch):
    """Bug 5 of issue 20: every profile's shapes satisfy min <= opt <= max in every dimension, --max-batch 1
    included (opt batch was always 2, above max)."""
    import json

    from export.build_trt import _profiles

    manifest = json.loads((TINY_BUNDLE / "bundle.json").read_text())
    for graph in ("decoder", "image_decoder", "vq_encoder", "vq_decoder"):
        for profile in _profiles(manifest, graph, max_batch=max_batch, max_side=128):
            for name, (lo, opt, hi) in profile.items():
                assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), (graph, name, lo, opt, hi)
                assert hi[0] == max_batch, (graph, name)


def test_host_capacity_blocks_grow_with_the_length():
    """Small blocks while the cache is short (few empty slots for attention to read), KV_BLOCK once it is long;
    capacities only grow, always hold what is needed, and never pass the KV_BLOCK multiple (TensorRT profiles)."""
    from emu3_rt.kv_cache import KV_BLOCK, capacity_for

    assert [capacity_for(n) for n in (1, 33, 300, 511, 512, 1000, 1500, 2048, 4097)] == \
        [32, 64, 320, 512, 512, 1024, 1536, 2048, 4352]
    caps = [capacity_for(n) for n in range(1, 9000)]
    assert all(c >= n for n, c in zip(range(1, 9000), caps)) and caps == sorted(caps)
    assert all(c <= -(-n // KV_BLOCK) * KV_BLOCK for n, c in zip(range(1, 9000), caps))
