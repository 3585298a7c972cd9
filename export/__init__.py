"""Offline export: an Emu3 -hf checkpoint -> ONNX graphs + bundle.json. torch and transformers live here only."""
