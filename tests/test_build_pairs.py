"""tools/build_pairs.py against a local imitation of an OpenAI-compatible endpoint, the rules judge end to end, and
the sample stage with an injected generator."""

import json
import os
import subprocess
import sys

import pytest

from medee_jax.data.formats import load_records
from medee_jax.pairs.build import run_stages
from medee_jax.pairs.candidates import read_candidates
from medee_jax.pairs.sample import demo_cases
from tests.eval_fixtures import FakeGenerator, write_jsonl, write_png
from tests.judge_server import JudgeServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test-SECRET-7f3a9"
OPTIONS = {"A": "Upper-left", "B": "Upper-right", "C": "Lower-left", "D": "Lower-right"}


def response(item, mode, score, letter):
    return f"[[id={item} mode={mode} score={score}]]\n<think>\nThe lesion is in a quadrant.\n</think>\nThe answer is {letter}"


def write_candidates(tmp_path) -> str:
    write_png(tmp_path / "data/images/a.png", 40)
    prompt = [{"from": "human", "value": "<image>Where is the lesion?\n" + "\n".join(f"{k}. {v}" for k, v in OPTIONS.items())}]
    cases = [
        {"id": "c1", "answer": "B", "responses": [response("c1r0", "ok", 8, "B"), response("c1r1", "429", 3, "A"),
                                                  response("c1r2", "500", 9, "C"), response("c1r3", "fenced", 6, "B")]},
        {"id": "c2", "answer": "A", "responses": [response("c2r0", "truncated", 7, "A"),
                                                  response("c2r1", "prose", 5, "D"), response("c2r2", "slow", 7, "B")]},
        {"id": "c3", "answer": "C", "responses": [response("c3r0", "timeout", 9, "C"), response("c3r1", "slow", 8, "A")]},
        {"id": "c4", "answer": "D", "responses": [response("c4r0", "slow", 5, "A"), response("c4r1", "ok", 2, "B")]},
    ]
    rows = [{"conversations": prompt, "images": ["images/a.png"], "options": OPTIONS, **case} for case in cases]
    return write_jsonl(tmp_path / "data/candidates.jsonl", rows)


def run_tool(tmp_path, server_url, key, workdir, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT, OPENAI_API_KEY=key)
    cmd = [sys.executable, os.path.join(ROOT, "tools/build_pairs.py"), "--config", os.path.join(ROOT, "configs/pairs.py"),
           "--config.stage=judge", f"--config.candidates={tmp_path / 'data/candidates.jsonl'}",
           f"--config.output={tmp_path / 'out/pairs.jsonl'}", "--config.judge.kind=openai",
           f"--config.judge.base_url={server_url}", "--config.judge.model=judge-model", "--config.judge.concurrency=2",
           "--config.judge.timeout_s=1.0", "--config.judge.max_retries=2", "--config.judge.backoff_s=0.05",
           "--workdir", str(workdir), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_openai_judge_through_the_tool(tmp_path):
    write_candidates(tmp_path)
    with JudgeServer(KEY) as server:
        done = run_tool(tmp_path, server.url, KEY, tmp_path / "work")
        assert done.returncode == 0, done.stderr
        first_requests = server.requests
        summary = json.loads((tmp_path / "work/summary.json").read_text())
        assert summary["cases"] == 4 and summary["responses"] == 11
        assert summary["judge_failures"] == {"malformed_scores": 1}  # the prose reply, after 2 retries
        assert summary["responses_judged"] == 10 and summary["pairs_written"] == 2
        assert summary["dropped"] == {"no_correct_response": 1, "tie": 1}
        # one request per response, plus a retry each for 429, 500, truncated and timeout, plus 2 for the prose
        assert summary["requests_sent"] == first_requests == 11 + 4 + 2
        assert summary["retries"] == 6 and summary["cache_hits"] == 0
        assert server.max_in_flight == 2  # the limit, reached with the slow replies
        assert server.attempts["c1r1"] == 2 and server.attempts["c2r1"] == 3
        assert json.loads(done.stdout) == summary
        body = server.bodies[0]
        image_part = body["messages"][1]["content"][0]
        assert image_part["type"] == "image_url" and image_part["image_url"]["url"].startswith("data:image/png;base64,")
        assert "The reference (correct) final answer is: " in body["messages"][0]["content"]

        pairs = [json.loads(line) for line in (tmp_path / "out/pairs.jsonl").read_text().splitlines()]
        assert [(p["id"], p["chosen"]["value"][:11], p["rejected"]["value"][:11]) for p in pairs] == [
            ("c1", "[[id=c1r0 m", "[[id=c1r1 m"), ("c3", "[[id=c3r0 m", "[[id=c3r1 m")]
        assert pairs[0]["scores"]["chosen"]["mean"] == 8 and pairs[0]["scores"]["rejected"]["mean"] == 3
        assert pairs[0]["rationale"] == {"chosen": "graded c1r0", "rejected": "graded c1r1"}
        assert len(pairs[0]["judgements"]) == 4 and pairs[0]["judgements"][2]["correct"] is False
        records = load_records(tmp_path / "out/pairs.jsonl", kind="preference")  # the trainer's reader
        assert records[0].chosen == pairs[0]["chosen"]["value"] and records[0].images == (str(tmp_path / "data/images/a.png"),)

        again = run_tool(tmp_path, server.url, KEY, tmp_path / "work")
        assert again.returncode == 0 and server.requests == first_requests  # a rerun sends no request
        rerun = json.loads((tmp_path / "work/summary.json").read_text())
        assert rerun["requests_sent"] == 0 and rerun["cache_hits"] == 11 and rerun["pairs_written"] == 2

        ablation = run_tool(tmp_path, server.url, KEY, tmp_path / "work", "--config.judge.criteria=reflection")
        assert ablation.returncode == 0 and server.requests == first_requests  # ablations reuse the judgements

        wrong = run_tool(tmp_path, server.url, "sk-wrong-key", tmp_path / "work401")
        assert wrong.returncode == 1 and "refused the API key" in wrong.stderr
        refused = json.loads((tmp_path / "work401/summary.json").read_text())
        assert refused["judge_failures"] == {"auth": 11} and refused["pairs_written"] == 0
        assert refused["requests_sent"] <= 2  # no more requests once the key is refused

    for path, text in [("stdout", done.stdout + again.stdout + wrong.stdout), ("stderr", done.stderr + wrong.stderr)]:
        assert KEY not in text, path
    for folder, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                assert KEY.encode() not in f.read(), name


def test_rules_judge_and_sample_stage_in_process(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.chdir(tmp_path)  # the default policy (workdir/sft) is relative: not a demo run of the checkout

    spec = importlib.util.spec_from_file_location("pairs_config", os.path.join(ROOT, "configs/pairs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.limit, c.sample.k, c.sample.batch_size = 12, 4, 5

    truth = {case.images[0]: case.answer for case in demo_cases(str(tmp_path / "w/demo"))}

    def answer_of(request, k):  # right on samples 0 and 1, wrong on 2 and 3
        right = truth[request.images[0].path]
        return right if k < 2 else "ABCD"[("ABCD".index(right) + 1) % 4]

    fake = FakeGenerator(answer_of)
    with pytest.raises(FileNotFoundError, match="run first: python -m medee_jax.pipeline --config configs/pipeline.py"):
        run_stages(c, str(tmp_path / "w0"))  # the default policy is the Stage-I demo workdir
    c.model = "embedded"
    summary = run_stages(c, str(tmp_path / "w"), load_generator=lambda spec: fake)
    cases = read_candidates(str(tmp_path / "w/candidates.jsonl"))
    assert len(cases) == 12 and all(len(case.responses) == 4 for case in cases)
    assert all(case.answer in "ABCD" and len(case.options) == 4 and os.path.isfile(case.images[0]) for case in cases)
    assert fake.requests == 12 and fake.calls == 3
    assert summary["cases"] == 12 and summary["responses_judged"] == 48 and summary["judge"]["kind"] == "rules"
    assert summary["pairs_written"] == 12 and summary["dropped"] == {}
    pairs = load_records(tmp_path / "w/pairs.jsonl", kind="preference")
    assert len(pairs) == summary["pairs_written"]

    again = FakeGenerator(answer_of)
    run_stages(c, str(tmp_path / "w"), load_generator=lambda spec: again)
    assert again.calls == 0  # resumed from the cached generations
    assert (tmp_path / "w/pairs.jsonl").read_text().count("\n") == summary["pairs_written"]
