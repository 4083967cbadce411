"""Run configs: recipes with presets, the embedded demo's sizes only for the demo (decided after overrides), one
name per setting between the run config and the input pipeline, and validation naming the fields."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import pytest

from medee_jax import recipes
from medee_jax.models import presets

MODEL_PRESETS = presets()
from medee_jax.training import setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = {mode: os.path.join(ROOT, "configs", f"{mode}.py") for mode in recipes.MODES}


def get_config(mode: str, preset: str | None = None):
    spec = importlib.util.spec_from_file_location(f"test_{mode}_config", CONFIG_FILES[mode])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if preset is None else module.get_config(preset)


def fake_checkpoint(path, preset: str) -> str:
    """A directory with only the config.json of a released size (enough for config validation)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(MODEL_PRESETS[preset].to_hf_dict(), f)
    return str(path)


@pytest.mark.parametrize("mode", recipes.MODES)
def test_config_files_import_the_package_without_path_edits(mode):
    source = open(CONFIG_FILES[mode]).read()
    assert "sys.path" not in source and "from medee_jax import recipes" in source
    assert not os.path.exists(os.path.join(ROOT, "configs", "base.py"))


@pytest.mark.parametrize("mode", recipes.MODES)
def test_the_demo_gets_demo_sizes_except_fields_the_user_set(mode):
    c = get_config(mode)
    assert c.demo == "auto" and c.model.dtype == "bfloat16" and c.model.remat == "full"  # the recipe
    resolved = setup.resolve_config(c, overridden={"data.batch_size"})
    assert resolved.demo is True and c.demo == "auto"  # a copy: the input is untouched
    for field, value in recipes.DEMO_SIZES[mode].items():
        if field != "data.batch_size":
            assert recipes.get_field(resolved, field) == value, field
    assert resolved.data.batch_size == c.data.batch_size != recipes.DEMO_SIZES[mode]["data.batch_size"]
    assert setup.resolve_config(resolved) is resolved  # resolving again changes nothing
    assert "embedded" in setup.describe_run(resolved)


@pytest.mark.parametrize("named", ["data.train", "model.checkpoint", "model.init_from"])
def test_a_run_naming_data_or_a_checkpoint_keeps_the_recipe(named, tmp_path):
    c = get_config("dpo")
    recipes.set_field(c, named, str(tmp_path))
    resolved = setup.resolve_config(c)
    assert resolved.demo is False
    recipe = get_config("dpo")
    for field in recipes.DEMO_SIZES["dpo"]:
        assert recipes.get_field(resolved, field) == recipes.get_field(recipe, field), field
    assert resolved.optimizer.lr == 5e-7 and resolved.model.dtype == "bfloat16"
    assert "demo sizes are not applied" in setup.describe_run(resolved)


def test_resolved_config_round_trips_through_json():
    resolved = setup.resolve_config(get_config("sft"))
    assert json.loads(resolved.to_json_best_effort())["demo"] is True


def test_demo_must_stay_auto_and_a_preset_needs_a_real_run():
    c = get_config("dpo")
    c.demo = "yes"
    with pytest.raises(ValueError, match="demo='yes': leave it 'auto'"):
        setup.resolve_config(c)
    with pytest.raises(ValueError, match="preset='qwen2_5_vl_7b' is for a real run"):
        setup.resolve_config(get_config("dpo", "qwen2_5_vl_7b"))


@pytest.mark.parametrize("mode", recipes.MODES)
@pytest.mark.parametrize("preset", list(recipes.PRESETS))
def test_presets_set_their_table_and_validate_against_their_size(mode, preset, tmp_path):
    c = get_config(mode, preset)
    assert c.preset == preset
    for field, value in recipes.PRESETS[preset].items():
        expected = value[mode] if isinstance(value, dict) else value
        assert recipes.get_field(c, field) == expected, field
    assert c.data.image_max_pixels == 768 * 768  # peers' training limit, not the processor's 12.8 MP
    c.model.checkpoint = fake_checkpoint(tmp_path / "ckpt", preset)
    c.data.train = str(tmp_path)
    resolved = setup.resolve_config(c)
    assert resolved.demo is False and resolved.data.batch_size == recipes.preset_values(preset, mode)["data.batch_size"]
    setup.validate_config(resolved, str(tmp_path / "work"))
    heads = MODEL_PRESETS[preset].text
    assert heads.num_key_value_heads % c.mesh.tensor == 0 and heads.num_attention_heads % c.mesh.tensor == 0


def test_preset_of_another_size_than_the_checkpoint_is_refused(tmp_path):
    c = get_config("sft", "qwen2_5_vl_7b")
    c.model.checkpoint = fake_checkpoint(tmp_path / "ckpt", "qwen2_5_vl_3b")
    c.data.train = str(tmp_path)
    with pytest.raises(ValueError, match="preset='qwen2_5_vl_7b' is for a model with hidden_size 3584 and 28 "
                                         "layers, but .* has hidden_size 2048 and 36 layers"):
        setup.validate_config(setup.resolve_config(c), str(tmp_path / "work"))


def test_pipeline_config_keeps_the_run_configs_names(tmp_path):
    """Every input-pipeline setting that has a run-config field has the same name there and the same value."""
    from medee_jax.data.pipeline import DataConfig

    c = setup.resolve_config(get_config("sft"))
    data = setup.DataSpec(str(tmp_path / "train.jsonl"), "", str(tmp_path), "", True)
    dc = setup.pipeline_config(c, data, "train")
    shared = [f.name for f in dataclasses.fields(DataConfig) if f.name in c.data]
    assert {"batch_size", "max_length", "length_buckets", "patch_buckets", "packing", "num_workers", "min_pixels",
            "max_pixels", "image_max_pixels", "on_bad_record", "shuffle"} <= set(shared)
    bounds = setup.image_bounds(c, data)  # 0 = the checkpoint's processor (here: no processor, class defaults)
    for name in shared:
        if name in ("media_root", "num_epochs"):  # "" = the data file's folder; train: endless, the loop counts
            continue
        value = c.data[name]
        if name in ("min_pixels", "max_pixels", "min_tiles", "max_tiles"):
            value = value or getattr(bounds, name)
        assert getattr(dc, name) == (tuple(value) if isinstance(value, tuple) else value), name
    assert (dc.min_pixels, dc.max_pixels) == (56 * 56, 224 * 224)  # the class floor, the demo's cap
    assert dc.num_epochs is None and setup.pipeline_config(c, data, "eval").num_epochs == 1
    assert setup.pipeline_config(c, data, "eval").shuffle is False
    assert setup.target_buckets(c) == tuple(c.data.length_buckets)


def test_validation_lists_every_problem_with_its_field(tmp_path):
    c = setup.resolve_config(get_config("dpo"))
    c.data.length_buckets = ("abc",)
    c.data.patch_buckets = ()
    c.dpo.loss_type = "exo_pair"
    c.data.image_max_pixels = -1
    with pytest.raises(ValueError) as e:
        setup.validate_config(c, str(tmp_path))
    message = str(e.value)
    for fragment in ("data.length_buckets=('abc',)", "data.patch_buckets=()", "dpo.loss_type 'exo_pair' needs 0 < "
                     "dpo.label_smoothing", "data.image_max_pixels=-1"):
        assert fragment in message, message
