"""The trainer end to end: mesh shapes, processes, gradient accumulation, frozen parts, resume, preemption."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "tests", "run_training.py")
SFT_CONFIG = os.path.join(ROOT, "configs", "sft.py")
DPO_CONFIG = os.path.join(ROOT, "configs", "dpo.py")

WORDS = ("fever cough lesion nodule left right upper lower chest scan mass round irregular dense small large "
         "patient pain acute chronic finding image shows normal abnormal answer").split()


def write_sft_records(path, n, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))
            a = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 12))))
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"Case {i}: {q}?"},
                                                  {"from": "gpt", "value": f"<think>{a}</think> The answer is {a}."}]})
                    + "\n")


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, demo_tokenizer_dir):
    d = tmp_path_factory.mktemp("sft_data")
    write_sft_records(d / "train.jsonl", 64)
    return str(d / "train.jsonl"), str(demo_tokenizer_dir)


def common(data, workdir, **extra):
    train, tokenizer = data
    overrides = {
        "data.train": train, "data.tokenizer": tokenizer, "data.max_length": 64, "data.length_buckets": (64,),
        "data.packing": False, "data.shuffle": False, "model.dtype": "float32", "optimizer.lr": 1e-3,
        "optimizer.warmup_ratio": 0.0, "train.steps": 3, "train.checkpoint_every": 100, "train.eval_every": 0,
        "train.async_checkpointing": False, "workdir": str(workdir),
    }
    overrides.update(extra)
    return [f"{k}={v!r}" if not isinstance(v, str) else f"{k}={v}" for k, v in overrides.items()]


def run(config, out, overrides, devices=1, env_extra=None, timeout=600):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, RUNNER, config, str(out), *overrides], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out))


def run_many(args, devices=1, timeout=900):
    """Runs several jobs (run_training.py arguments joined by --then) in one process."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, RUNNER, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


def params_of(result):
    return {k: v for k, v in result.items() if k.startswith("params/")}


def assert_same_params(a, b, atol, rtol=0.0):
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys() and pa
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], atol=atol, rtol=rtol, err_msg=k)


@pytest.fixture(scope="module")
def one_device_run(sft_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("one_device")
    return run(SFT_CONFIG, d / "out.npz", common(sft_data, d / "work", **{"data.batch_size": 8}))


@pytest.mark.parametrize("mesh", [dict(fsdp=4, tensor=2), dict(data=2, fsdp=4)])
def test_mesh_shapes_match_one_device(sft_data, one_device_run, tmp_path, mesh):
    """8 simulated devices: the same 8 examples per step split over data shards give the same training."""
    shards = mesh.get("data", 1) * mesh.get("fsdp", 1)
    overrides = common(sft_data, tmp_path / "work", **{"data.batch_size": 8 // shards,
                                                       "mesh.data": mesh.get("data", 1),
                                                       "mesh.fsdp": mesh.get("fsdp", 1),
                                                       "mesh.tensor": mesh.get("tensor", 1)})
    result = run(SFT_CONFIG, tmp_path / "out.npz", overrides, devices=8)
    np.testing.assert_allclose(result["losses"], one_device_run["losses"], rtol=1e-5)
    assert one_device_run["losses"][-1] < one_device_run["losses"][0]
    assert_same_params(result, one_device_run, atol=2e-5)


def test_two_processes_match_one(sft_data, one_device_run, tmp_path):
    """Two local processes joined by jax.distributed (4 devices each, data=2 x fsdp=4) equal one process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = common(sft_data, tmp_path / "work", **{"data.batch_size": 1, "mesh.data": 2, "mesh.fsdp": 4,
                                                       "train.export_hf": True})
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, RUNNER, SFT_CONFIG, str(tmp_path / f"out{i}.npz"), *overrides],
                              env=dict(env, JAX_PROCESS_ID=str(i)), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    result = dict(np.load(tmp_path / "out0.npz"))
    np.testing.assert_allclose(result["losses"], one_device_run["losses"], rtol=1e-5)
    assert_same_params(result, one_device_run, atol=2e-5)
    from safetensors.numpy import load_file  # the export gathered the parameters from both hosts

    exported = load_file(str(tmp_path / "work" / "hf" / "model.safetensors"))
    np.testing.assert_array_equal(exported["model.norm.weight"], result["params/language_model/norm"])


def test_grad_accumulation_equals_big_batch(sft_data, one_device_run, tmp_path):
    """4 micro-batches of 2 == one batch of 8 (exact global token mean); frozen vision never changes."""
    overrides = common(sft_data, tmp_path / "work", **{"data.batch_size": 2, "data.grad_accum_steps": 4})
    result = run(SFT_CONFIG, tmp_path / "out.npz", overrides)
    np.testing.assert_allclose(result["losses"], one_device_run["losses"], rtol=1e-5)
    assert_same_params(result, one_device_run, atol=2e-6)


def test_frozen_vision_and_reference_do_not_change(sft_data, tmp_path):
    """DPO with the default recipe: vision tower + projector frozen, reference frozen, policy LM moves."""
    from medee_jax.training.loop import Trainer
    from tests.run_training import flatten, load_config

    d = tmp_path
    pairs = d / "pairs.jsonl"
    rng = np.random.default_rng(1)
    with open(pairs, "w") as f:
        for i in range(16):
            q = " ".join(rng.choice(WORDS, size=5))
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"Case {i}: {q}?"}],
                                "chosen": {"from": "gpt", "value": "The lesion is in the left upper lobe."},
                                "rejected": {"from": "gpt", "value": "There is no lesion at all."}}) + "\n")
    config = load_config(DPO_CONFIG, [o for o in common((str(pairs), sft_data[1]), d / "work",
                                                          **{"data.batch_size": 2, "data.length_buckets": (64,)})])
    trainer = Trainer(config)
    import jax

    before = {k: np.asarray(v) for k, v in flatten(jax.device_get(trainer.frozen)).items()}
    params_before = {k: np.asarray(v) for k, v in flatten(jax.device_get(trainer.params)).items()}
    result = trainer.run()
    assert result.stopped == "done" and result.steps == 3
    after = flatten(jax.device_get(trainer.state.frozen))
    ref = flatten(jax.device_get(trainer.state.ref))
    assert before.keys() == after.keys() and any("visual" in k for k in before)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    for k, v in ref.items():
        np.testing.assert_array_equal(v, params_before[k])
    moved = flatten(jax.device_get(trainer.state.params))
    assert any(np.abs(moved[k] - params_before[k]).max() > 0 for k in moved)


@pytest.fixture(scope="module")
def family_data(tmp_path_factory, demo_tokenizer_dir, internvl_tokenizer_dir):
    """Per family: (the embedded model's config overrides, a small image demo set (multimodal SFT, DPO pairs))."""
    from medee_jax.data.demo import generate_demo

    paths = generate_demo(tmp_path_factory.mktemp("family_demo"), num_sft=4, num_pairs=16, num_eval=4)
    image_data = {"data.max_length": 256, "data.length_buckets": (256,), "data.max_pixels": 224 * 224}
    return paths, {
        "qwen2_5_vl": {"data.tokenizer": str(demo_tokenizer_dir), **image_data},
        "internvl": {"data.tokenizer": str(internvl_tokenizer_dir), "model.family": "internvl",
                     "data.tile_buckets": (4, 8), **image_data},
    }


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl"])
def test_family_steps_on_8_devices_equal_one_device(family_data, tmp_path, family):
    """Each family's SFT and DPO steps with images (the family's vision part, frozen vision encoded once per pair)
    on data=2 x fsdp=2 x tensor=2 simulated devices equal one device taking the same 4 examples per step."""
    paths, extra = family_data
    base = {**extra[family], "train.steps": 2, "optimizer.lr": 1e-4}
    jobs = {}
    mesh = {"data.batch_size": 1, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    for name, devices, shape in (("one", 1, {"data.batch_size": 4}), ("eight", 8, mesh)):
        args = []
        for mode, config in (("sft", SFT_CONFIG), ("dpo", DPO_CONFIG)):
            train = str(paths["mm_sft_train" if mode == "sft" else "dpo_train"])
            args += ["--then", config, str(tmp_path / f"{name}_{mode}.npz"),
                     *common((train, ""), tmp_path / f"{name}_{mode}", **base, **shape)]
        run_many(args[1:], devices=devices)
        jobs[name] = {mode: dict(np.load(tmp_path / f"{name}_{mode}.npz")) for mode in ("sft", "dpo")}
    for mode in ("sft", "dpo"):
        one, eight = jobs["one"][mode], jobs["eight"][mode]
        np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-5, err_msg=mode)
        assert one["losses"][-1] != one["losses"][0]
        assert_same_params(eight, one, atol=2e-5)
        assert any(k.startswith("frozen/vision" if family == "internvl" else "frozen/visual") for k in one)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl"])
def test_kill_and_resume_is_exact(sft_data, family_data, tmp_path, family):
    """SIGKILL after a checkpoint, restart with the same workdir: the final params equal an uninterrupted run
    (Qwen2.5-VL on text SFT; InternVL on DPO pairs with images, so the tiles' data state resumes too)."""
    steps = {"train.steps": 8, "train.checkpoint_every": 2, "data.batch_size": 4, "data.shuffle": True}
    config = SFT_CONFIG
    data = sft_data
    if family == "internvl":
        paths, extra = family_data
        steps = {**extra[family], **steps, "data.batch_size": 2, "train.steps": 6}
        config, data = DPO_CONFIG, (str(paths["dpo_train"]), "")
    straight = run(config, tmp_path / "straight.npz", common(data, tmp_path / "straight", **steps))
    workdir = tmp_path / "killed"
    overrides = common(data, workdir, **steps)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, RUNNER, config, str(tmp_path / "ignored.npz"), *overrides],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and sum(1 for _ in open(metrics)) >= steps["train.steps"] - 3 and proc.poll() is None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "ignored.npz").exists(), "the run finished before it could be killed"
    resumed = run(config, tmp_path / "resumed.npz", overrides)
    assert int(resumed["steps"]) == steps["train.steps"]
    logged = [json.loads(line)["step"] for line in open(metrics) if "loss" in json.loads(line)]
    assert logged == list(range(1, steps["train.steps"] + 1))  # the steps redone after the kill are logged once
    pa, pb = params_of(straight), params_of(resumed)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(sft_data, tmp_path):
    workdir = tmp_path / "work"
    overrides = common(sft_data, workdir, **{"train.steps": 200, "data.batch_size": 2})
    cmd = [sys.executable, "-m", "medee_jax.train", "--config", SFT_CONFIG, f"--workdir={workdir}"]
    cmd += [f"--config.{o}" for o in overrides if not o.startswith("workdir=")]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and sum(1 for _ in open(metrics)) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    result = json.load(open(workdir / "result.json"))
    assert result["stopped"] == "preempted"
    saved = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
    assert saved and saved[-1] == result["steps"] < 200


def test_nonfinite_steps_are_skipped_then_stop(sft_data, tmp_path, monkeypatch):
    from medee_jax.training import steps
    from medee_jax.training.loop import Trainer
    from tests.run_training import flatten, load_config

    real = steps.sft_sums

    def poisoned(model, batch, opts):
        total, count = real(model, batch, opts)
        return total * float("nan"), count

    monkeypatch.setattr(steps, "sft_sums", poisoned)
    config = load_config(SFT_CONFIG, common(sft_data, tmp_path / "work", **{"train.steps": 10,
                                                                            "train.max_nonfinite_in_a_row": 3}))
    trainer = Trainer(config)
    import jax

    before = flatten(jax.device_get(trainer.params))
    result = trainer.run()
    assert result.stopped == "nonfinite" and result.steps == 3
    assert int(trainer.state.nonfinite_total) == 3
    after = flatten(jax.device_get(trainer.state.params))
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    assert not os.path.isdir(tmp_path / "work" / "checkpoints") or not [
        p for p in os.listdir(tmp_path / "work" / "checkpoints") if p.isdigit()]


def test_invalid_config_fails_before_compute_naming_fields(sft_data, tmp_path):
    from medee_jax.training.setup import validate_config
    from tests.run_training import load_config

    config = load_config(DPO_CONFIG, common(sft_data, tmp_path, **{"dpo.loss_type": "nope", "data.packing": True,
                                                                    "mesh.tensor": 0}))
    with pytest.raises(ValueError) as e:
        validate_config(config)
    for field in ("dpo.loss_type", "data.packing", "mesh.tensor"):
        assert field in str(e.value)


def write_pairs(path, n, seed=1):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choice(WORDS, size=5))
            good = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 8))))
            bad = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 8))))
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"Case {i}: {q}?"}],
                                "chosen": {"from": "gpt", "value": f"The lesion is {good}."},
                                "rejected": {"from": "gpt", "value": f"No lesion; {bad}."}}) + "\n")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl"])
def test_precomputed_reference_equals_frozen_copy(sft_data, family_data, tmp_path, family):
    """One pass of the initial policy stores reference log-probs; training then matches the frozen-copy mode
    (Qwen2.5-VL on text pairs; InternVL on pairs with images, whose tiles the reference pass encodes too)."""
    from medee_jax.training.loop import Trainer
    from tests.run_training import flatten, load_config

    pairs, extra = tmp_path / "pairs.jsonl", {}
    if family == "internvl":
        paths, overrides = family_data
        lines = open(paths["dpo_train"]).read().splitlines()[:12]
        pairs.write_text("".join(json.dumps({**json.loads(line), "images": [
            os.path.join(paths["root"], p) for p in json.loads(line)["images"]]}) + "\n" for line in lines))
        extra = overrides[family]
    else:
        write_pairs(pairs, 12)
    runs = {}
    for mode in ("frozen", "precomputed"):
        config = load_config(DPO_CONFIG, common((str(pairs), sft_data[1]), tmp_path / mode,
                                                **{**extra, "data.batch_size": 2, "dpo.reference": mode}))
        trainer = Trainer(config)
        result = trainer.run()
        assert result.stopped == "done"
        runs[mode] = (trainer, result)
    frozen, pre = runs["frozen"][0], runs["precomputed"][0]
    assert pre.state.ref is None and frozen.state.ref is not None
    annotated = [json.loads(line) for line in open(tmp_path / "precomputed" / "reference" / "train.jsonl")]
    assert len(annotated) == 12 and all(r["ref_chosen_logps"] < 0 and r["ref_rejected_logps"] < 0 for r in annotated)
    import jax

    a, b = flatten(jax.device_get(frozen.state.params)), flatten(jax.device_get(pre.state.params))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
    assert runs["frozen"][1].final_metrics["loss"] == pytest.approx(runs["precomputed"][1].final_metrics["loss"],
                                                                    rel=1e-5)


def test_shared_prompt_rows_train_like_separate_rows(sft_data, tmp_path):
    """dpo.share_prompt (one row per pair, the prompt once) trains to the parameters of separate chosen/rejected
    rows: same log-probs, same gradients, same updates."""
    from medee_jax.training.loop import Trainer
    from tests.run_training import flatten, load_config

    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs, 12)
    runs = {}
    for shared in (False, True):
        config = load_config(DPO_CONFIG, common((str(pairs), sft_data[1]), tmp_path / f"shared{shared}",
                                                **{"data.batch_size": 2, "dpo.share_prompt": shared}))
        trainer = Trainer(config)
        result = trainer.run()
        assert result.stopped == "done"
        runs[shared] = (trainer, result)
    import jax

    rows = {shared: runs[shared][0].train_source.data_config.share_prompt for shared in runs}
    assert rows == {False: False, True: True}
    a = flatten(jax.device_get(runs[False][0].state.params))
    b = flatten(jax.device_get(runs[True][0].state.params))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-5, err_msg=k)  # as the mesh-shape test: float reordering
    for name in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert runs[True][1].final_metrics[name] == pytest.approx(runs[False][1].final_metrics[name], rel=1e-4,
                                                                  abs=1e-6), name


def test_stage1_result_initialises_stage2_and_exports_to_hf(sft_data, tmp_path):
    """SFT workdir -> DPO policy and reference (model.init_from); DPO exports a checkpoint transformers loads."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medee_jax.training.loop import Trainer
    from tests.run_training import flatten, load_config

    stage1 = Trainer(load_config(SFT_CONFIG, common(sft_data, tmp_path / "stage1", **{"data.batch_size": 4})))
    stage1.run()
    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs, 8)
    overrides = common((str(pairs), sft_data[1]), tmp_path / "stage2", **{"data.batch_size": 2, "train.steps": 2,
                                                                           "train.export_hf": True})
    overrides = [o for o in overrides if not o.startswith("data.tokenizer=")]  # taken from the stage-1 workdir
    stage2 = Trainer(load_config(DPO_CONFIG, overrides + [f"model.init_from={tmp_path / 'stage1'}"]))
    import jax

    end1 = flatten(jax.device_get({"params": stage1.state.params, "frozen": stage1.state.frozen}))
    start2 = flatten(jax.device_get({"params": stage2.params, "frozen": stage2.frozen}))
    assert end1.keys() == start2.keys()
    for k in end1:
        np.testing.assert_array_equal(end1[k], start2[k], err_msg=k)
    stage2.run()
    ref = flatten(jax.device_get(stage2.state.ref))
    for k, v in ref.items():
        np.testing.assert_array_equal(v, end1[f"params/{k}"])
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "stage2" / "hf", attn_implementation="eager")
    ids = np.array([[5, 17, 42, 99, 7, 3]])
    ours = np.asarray(stage2.merged_model(stage2.state)(ids))
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids))).logits.float().numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert (tmp_path / "stage2" / "hf" / "tokenizer.json").exists()
