"""The run log and the drift policy of training: train_log.jsonl, the checkpoint's drift record, --drift."""

import json
import re

import pytest
import torch

from pyramidflow.checkpoint import load_checkpoint
from pyramidflow.cli import build_parser
from pyramidflow.train import TrainConfig
from pyramidflow.train.log import LOG_NAME, trim_log

from test_train import run


pytestmark = pytest.mark.usefixtures("one_thread")


def _log(out_dir):
    return [json.loads(line) for line in (out_dir / LOG_NAME).read_text().splitlines()]


def test_log_and_checkpoint_record_the_largest_drift_per_interval(tmp_path):
    result = run(tmp_path / "a", steps=4)
    assert result.model.flow.drift == "recompute"  # the training default
    log = _log(tmp_path / "a")
    assert [r["step"] for r in log] == [2, 4]
    assert [r["loss"] for r in log] == [result.losses[1], result.losses[3]]
    for record in log:
        assert record["images_per_s"] > 0
        assert 0 < record["max_drift"] < 1e-4  # a healthy small model, measured
    assert load_checkpoint(result.checkpoint_path).drift == [[r["step"], r["max_drift"]] for r in log]


def test_the_first_record_of_each_run_holds_the_threads_it_ran_with(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    out = tmp_path / "cpu"
    run(out, steps=4)
    cpu = {"threads": 1, "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None}  # one_thread, and the variables above
    assert [r.get("cpu") for r in _log(out)] == [cpu, None]
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    run(out, steps=8, resume=True)
    assert [r.get("cpu") for r in _log(out)] == [cpu, None, {**cpu, "GOMP_SPINCOUNT": "300000"}, None]


def test_drift_off_logs_no_measurement_and_passes_through(tmp_path):
    result = run(tmp_path / "off", steps=2, drift="off")
    assert result.model.flow.drift == "off"
    assert [r["max_drift"] for r in _log(tmp_path / "off")] == [None]


def test_resume_keeps_one_line_per_interval_and_may_change_the_policy(tmp_path):
    out = tmp_path / "r"
    run(out, steps=2)
    with open(out / LOG_NAME, "a") as handle:  # a line written after the checkpoint, before a crash
        handle.write(json.dumps({"step": 3, "loss": 0.0, "images_per_s": 1.0, "max_drift": 0.5}) + "\n")
    resumed = run(out, steps=4, resume=True, drift="warn")
    assert resumed.model.flow.drift == "warn"
    assert [r["step"] for r in _log(out)] == [2, 4]
    assert [h[0] for h in load_checkpoint(resumed.checkpoint_path).drift] == [2, 4]


def test_trim_log_without_a_log_is_a_no_op(tmp_path):
    trim_log(tmp_path / LOG_NAME, 3)
    assert not (tmp_path / LOG_NAME).exists()


def test_bad_policy_and_cli_flag():
    with pytest.raises(ValueError, match=r"TrainConfig: drift must be one of \('warn', 'raise', 'recompute', 'off'\)"):
        TrainConfig(steps=1, drift="sometimes")
    parser = build_parser()
    args = parser.parse_args(["train", "--data", "d", "--category", "c", "--out", "o", "--drift", "warn"])
    assert args.drift == "warn"
    assert parser.parse_args(["train", "--data", "d", "--category", "c", "--out", "o"]).drift == "recompute"


def test_resume_drops_a_torn_last_line_with_a_warning(tmp_path):
    out = tmp_path / "torn"
    run(out, steps=2)
    with open(out / LOG_NAME, "a") as handle:  # killed in the middle of writing the line of step 3
        handle.write('{"step": 3, "loss": 0.1')
    with pytest.warns(UserWarning, match=rf"the last line of {re.escape(str(out / LOG_NAME))} is torn"):
        run(out, steps=4, resume=True)
    assert [r["step"] for r in _log(out)] == [2, 4]


def test_a_last_line_without_its_newline_is_kept_and_the_next_starts_a_line(tmp_path):
    out = tmp_path / "nl"
    run(out, steps=2)
    (out / LOG_NAME).write_text((out / LOG_NAME).read_text().rstrip("\n"))
    run(out, steps=4, resume=True)
    assert [r["step"] for r in _log(out)] == [2, 4]


def test_a_damaged_line_before_the_last_is_named(tmp_path):
    path = tmp_path / LOG_NAME
    path.write_text('{"step": 2}\nnot json\n{"step": 4}\n')
    with pytest.raises(ValueError, match=rf"train: line 2 of {re.escape(str(path))} is not a JSON record \('not json'\); repair or "
                                         "delete the file"):
        trim_log(path, 3)
    assert path.read_text() == '{"step": 2}\nnot json\n{"step": 4}\n'
