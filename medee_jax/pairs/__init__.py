"""Stage-II data: sample the Stage-I model, judge each response under MMRP (rules, an OpenAI-compatible endpoint,
or one of our checkpoints), and write preference pairs (`tools/build_pairs.py`). Pure Python; jax only when a
model generates."""
