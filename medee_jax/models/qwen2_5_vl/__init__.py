"""Qwen2.5-VL: ``config.py`` (config.json <-> dataclasses, presets 3B-72B), ``model.py`` (the NNX vision tower with
window attention and patch merger, around the shared decoder), ``keys.py`` (checkpoint key layouts),
``host.py`` and ``vision_layout.py`` (jax-free: image loading, token counts, M-RoPE positions, window layout).

Importing this package imports nothing else (data workers import its host modules without jax).
"""
