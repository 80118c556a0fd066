"""metrics.jsonl on resume: complete records up to the resumed step survive, a hard kill's partial last line
and the records after the step go."""
import json

import pytest

from megatron_simko.metrics import MetricsLogger


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_run(tmp_path, steps):
    log = MetricsLogger(str(tmp_path), tensorboard=False)
    for s in steps:
        log.log(s, {"reward/mean": s / 10})
    log.close()
    return tmp_path / "metrics.jsonl"


def test_resume_drops_a_partial_last_line_and_later_steps(tmp_path):
    path = _write_run(tmp_path, [1, 2, 3])
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"step": 4, "time": 1.0, "rewa')  # killed mid-write
    with pytest.warns(UserWarning, match="partial last line"):
        log = MetricsLogger(str(tmp_path), tensorboard=False, resume_step=2)
    assert [r["step"] for r in _lines(path)] == [1, 2]
    log.log(3, {"reward/mean": 0.7})
    assert [(r["step"], r["reward/mean"]) for r in _lines(path)] == [(1, 0.1), (2, 0.2), (3, 0.7)]


def test_resume_keeps_a_complete_last_record_without_newline(tmp_path):
    path = _write_run(tmp_path, [1, 2])
    path.write_text(path.read_text().rstrip("\n"))  # killed between the record and its newline
    MetricsLogger(str(tmp_path), tensorboard=False, resume_step=2).log(3, {"x": 1.0})
    assert [r["step"] for r in _lines(path)] == [1, 2, 3]


def test_a_corrupt_line_inside_the_file_is_named(tmp_path):
    path = _write_run(tmp_path, [1, 2])
    path.write_text("not json\n" + path.read_text())
    with pytest.raises(ValueError, match="metrics.jsonl: line 1 is not valid JSON"):
        MetricsLogger(str(tmp_path), tensorboard=False, resume_step=2)


def test_a_fresh_run_starts_a_fresh_file(tmp_path):
    path = _write_run(tmp_path, [1, 2, 3])
    MetricsLogger(str(tmp_path), tensorboard=False).log(1, {"x": 1.0})
    assert [r["step"] for r in _lines(path)] == [1]
