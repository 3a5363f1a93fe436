"""The demo stopped and continued (NOTE [a resumable demo]), and its hint for a slow machine."""

import json
import re

import pytest

import pyramidflow.experiments.demo as demo
import pyramidflow.train.loop as loop
from pyramidflow.cli import main

SMALL_DEMO = ["--steps", "3", "--size", "32", "--device", "cpu"]


def _error_line(capsys) -> str:
    """The one error line, last on stderr; the progress bars above it are the only other lines."""
    lines = [line for line in re.split(r"[\r\n]+", capsys.readouterr().err) if line.strip()]
    messages = [line for line in lines if not re.match(r"[^:|]+:\s+\d+%\|", line)]
    assert len(messages) == 1 and messages[0] == lines[-1] and lines[-1].startswith("error: "), messages
    return lines[-1]


def _summary(out) -> dict:
    summary = json.loads((out / "metrics.json").read_text())
    summary.pop("seconds")
    return summary


def test_a_stopped_demo_says_how_to_continue_once_and_resume_gives_the_uninterrupted_result(tmp_path, monkeypatch,
                                                                                            capsys):
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    steps, real_step = [], loop.training_step

    def stopped_in_the_second_category(*args, **kwargs):
        steps.append(1)
        if len(steps) == 5:  # the second step of the second category
            raise KeyboardInterrupt()
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "training_step", stopped_in_the_second_category)
    assert main(["demo", "--out", str(stopped), *SMALL_DEMO]) == 130
    line = _error_line(capsys)  # one line: the training's note is not printed besides it
    advised = f"pyramidflow demo --out {stopped} --steps 3 --size 32 --resume"
    assert line.startswith("error: demo: interrupted in nut, 1 of 3 categories finished") and advised in line
    monkeypatch.setattr(loop, "training_step", real_step)

    assert main(["demo", "--out", str(stopped), *SMALL_DEMO]) == 1  # a fresh demo would overwrite it
    assert "holds a demo already" in (refused := _error_line(capsys)) and "--resume" in refused
    assert main(["demo", "--out", str(stopped), "--steps", "4", "--size", "32", "--device", "cpu", "--resume"]) == 1
    assert "was started with --steps 3 (given 4)" in _error_line(capsys)

    assert main(advised.split()[1:] + ["--device", "cpu"]) == 0  # the advised command, as a user types it
    assert "evaluated before" in capsys.readouterr().out  # the finished category is not trained again
    assert main(["demo", "--out", str(straight), *SMALL_DEMO]) == 0
    assert _summary(stopped) == _summary(straight)


def test_resume_of_a_folder_without_a_demo_is_refused(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "none"), *SMALL_DEMO, "--resume"]) == 1
    assert "holds no demo" in _error_line(capsys)


@pytest.mark.parametrize("seconds_per_step, hinted", [(0.05, False), (8.0, True)])
def test_a_slow_step_gets_a_hint_with_flags_the_demo_takes(tmp_path, monkeypatch, seconds_per_step, hinted):
    """The hint's command runs a smaller demo: the flags exist, and they are smaller than the run's."""
    from pyramidflow.cli import build_parser
    from pyramidflow.model import PyramidFlowConfig
    from pyramidflow.train import TrainConfig

    clock = iter([0.0, seconds_per_step])
    monkeypatch.setattr(demo.time, "perf_counter", lambda: next(clock))
    said = []
    demo._hint_if_slow(PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=1, num_levels=3),
                       TrainConfig(steps=200, device="cpu"), 32, 3, tmp_path / "demo", said.append)
    assert bool(said) == hinted
    if hinted:
        assert "8.0 s" in said[0] and "about 80 min" in said[0]
        command = said[0].split("`")[1].split()
        assert command[:2] == ["pyramidflow", "demo"]
        suggested = build_parser().parse_args(command[1:])  # the flags it suggests exist
        assert (suggested.size, suggested.steps) == (32, 40)  # never larger than the run: 32 px, 200 steps


def test_a_slow_step_of_a_small_demo_suggests_no_smaller_one(tmp_path, monkeypatch):
    from pyramidflow.model import PyramidFlowConfig
    from pyramidflow.train import TrainConfig

    clock = iter([0.0, 30.0])
    monkeypatch.setattr(demo.time, "perf_counter", lambda: next(clock))
    said = []
    demo._hint_if_slow(PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=1, num_levels=3),
                       TrainConfig(steps=40, device="cpu"), 64, 3, tmp_path / "demo", said.append)
    assert "about 60 min" in said[0] and "`" not in said[0] and "--resume continues" in said[0]
