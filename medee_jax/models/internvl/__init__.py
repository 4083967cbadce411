"""InternVL3: ``config.py`` (config.json in the "-hf" and original layouts <-> dataclasses, presets 1B-78B),
``model.py`` (NNX InternViT in the 300M and 6B styles, pixel shuffle, projector, around the shared decoder),
``keys.py`` (the "-hf" and original checkpoint key layouts), ``host.py`` (jax-free: tiling, token counts,
positions).

Importing this package imports nothing else (data workers import its host module without jax).
"""
