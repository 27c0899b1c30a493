"""Every subcommand with nothing but its defaults, the preset and the model: exit 0 and the artifacts it promises.

The commands run in order on one run directory (runs/pirate under a temporary working folder),
as a new user would type them, on the shipped pirate constitution and the tiny test model.
No test here sets any other option: a command that only works with non-default settings fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from character_baker.core.runs import read_jsonl

PIRATE = Path(__file__).resolve().parent.parent / "constitutions" / "pirate.yaml"
RUN = Path("runs") / "pirate"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The working folder every command of this module runs in (runs/ is created there)."""
    return tmp_path_factory.mktemp("matrix")


@pytest.fixture(autouse=True)
def _inside(workdir, monkeypatch):
    monkeypatch.chdir(workdir)


@pytest.fixture
def defaults(tiny_model_dir):
    """`COMMAND pirate.yaml --preset smoke --model TINY`: the only settings a matrix command gets."""
    return lambda command: [command, str(PIRATE), "--preset", "smoke", "--model", str(tiny_model_dir)]


def _adapter(folder: Path) -> None:
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()


def _done(*stages: str) -> None:
    manifest = json.loads((RUN / "manifest.json").read_text())
    for stage in stages:
        assert manifest["stages"][stage]["status"] == "done", stage


def test_distill(cli, defaults):
    code, out, err = cli(*defaults("distill"))
    assert code == 0, err
    assert read_jsonl(RUN / "data" / "prompts.jsonl") and read_jsonl(RUN / "data" / "distill.jsonl")
    _adapter(RUN / "adapters" / "distill")
    assert read_jsonl(RUN / "logs" / "distill.jsonl")
    assert f"adapter: {RUN / 'adapters' / 'distill'}" in out
    _done("prompts", "distill_data", "distill")


def test_introspect(cli, defaults):
    code, out, err = cli(*defaults("introspect"))
    assert code == 0, err
    assert read_jsonl(RUN / "data" / "introspection.jsonl")
    _adapter(RUN / "adapters" / "introspect")
    _done("introspect_data", "introspect")


def test_merge(cli):
    code, out, err = cli("merge", str(RUN))
    assert code == 0, err
    _adapter(RUN / "adapters" / "persona")
    assert (RUN / "model" / "config.json").is_file() and list((RUN / "model").glob("*.safetensors"))


def test_calibrate(cli):
    code, out, err = cli("calibrate", str(RUN))
    assert code == 0, err
    table = json.loads((RUN / "logs" / "calibration.json").read_text())
    assert [row["scale"] for row in table["rows"]][0] == 0.0 and table["choice"]["scale"] in table["scales_tried"]
    assert "chosen scale" in out and (RUN / "model" / "config.json").is_file()


def test_export(cli):
    code, out, err = cli("export", str(RUN))
    assert code == 0, err
    export = RUN / "export"
    assert (export / "config.json").is_file() and list(export.glob("*.safetensors"))
    assert (export / "README.md").is_file() and (export / "tokenizer_config.json").is_file()


def test_eval_uses_the_runs_own_recipe(cli):
    code, out, err = cli("eval", str(RUN))
    assert code == 0, err
    report = json.loads((RUN / "eval" / "report.json").read_text())
    assert (RUN / "eval" / "report.html").is_file()
    # No --preset: the run's recorded recipe (smoke: 4 plain prompts) decides the sizes, not the defaults (200).
    assert report["prompt_sets"]["plain"] == 4
    assert json.loads((RUN / "manifest.json").read_text())["recipe"]["preset"] == "smoke"


def test_profile(cli, defaults):
    code, out, err = cli(*defaults("profile"))
    assert code == 0, err
    for name in ("profile.safetensors", "summary.json", "heatmap.png"):
        assert (RUN / "profile" / name).is_file()


def test_steer(cli, defaults):
    code, out, err = cli(*defaults("steer"))
    assert code == 0, err
    assert "strength 0 " in out and "strength 8 " in out


def test_sdft(cli, defaults):
    code, out, err = cli(*defaults("sdft"))
    assert code == 0, err
    _adapter(RUN / "adapters" / "sdft")
    assert read_jsonl(RUN / "logs" / "sdft.jsonl") and "sdft adapter, no system prompt" in out


def test_push_pull_joins_distill_by_default(cli, defaults):
    code, out, err = cli(*defaults("push-pull"))
    assert code == 0, err
    log = read_jsonl(RUN / "logs" / "distill.jsonl")
    assert log and all("push_pull_loss" in record for record in log)
    assert "push_pull_loss" in out
    _adapter(RUN / "adapters" / "distill")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_serve_starts_and_answers(workdir):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "character_baker", "serve", str(RUN), "--port", str(port)],
                              cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, health = time.monotonic() + 120, None
        while health is None and time.monotonic() < deadline and server.poll() is None:
            try:
                health = _get(f"http://127.0.0.1:{port}/health")
            except OSError:
                time.sleep(0.5)
        assert health is not None, server.stdout.read() if server.poll() is not None else "no /health in 120 s"
        answer = _get(f"http://127.0.0.1:{port}/v1/chat/completions",
                      {"model": "pirate", "messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 8})
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert answer["usage"]["completion_tokens"] >= 1
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_train_runs_the_whole_chain(cli, tiny_model_dir):
    code, out, err = cli("train", str(PIRATE), "--preset", "smoke", "--model", str(tiny_model_dir),
                         "--runs-root", "fresh")
    assert code == 0, err
    run = Path("fresh") / "pirate"
    manifest = json.loads((run / "manifest.json").read_text())
    for stage in ("prompts", "distill_data", "distill", "introspect_data", "introspect", "merge", "calibrate", "eval"):
        assert manifest["stages"][stage]["status"] == "done", stage
    assert (run / "model" / "config.json").is_file() and (run / "eval" / "report.html").is_file()
    assert f"report: {run / 'eval' / 'report.html'}" in out
