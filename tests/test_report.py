"""Tests for llmdpd_pl.report: ``llmdpd report`` over synthetic results JSONs with known counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmdpd_pl.cli import main
from llmdpd_pl.report import bootstrap_difference, load_arm, summarize

EPISODES = 50


def _results(path: Path, successes: dict[str, int]) -> Path:
    """A results JSON as ``llmdpd test`` writes it: agent and expert rows, reach seen and box-close unseen."""
    rows = []
    for task, k in successes.items():
        split = "unseen" if task == "box-close" else "seen"
        for policy, won in (("agent", k), ("expert", EPISODES)):
            rows.append({"task": task, "split": split, "policy": policy, "episodes": EPISODES,
                         "success_rate": won / EPISODES})  # fmt: skip
    path.write_text(json.dumps({"meta": {}, "results": rows}))
    return path


@pytest.fixture
def arms(tmp_path: Path) -> dict[str, str]:
    """both: reach 45, 40, 50 of 50 and box-close 10, 15, 5; none: reach 10, 5, 0 and box-close 10, 15, 5."""
    for i, (reach, box) in enumerate([(45, 10), (40, 15), (50, 5)]):
        _results(tmp_path / f"both_seed{i}.json", {"reach": reach, "box-close": box})
    for i, (reach, box) in enumerate([(10, 10), (5, 15), (0, 5)]):
        _results(tmp_path / f"none_seed{i}.json", {"reach": reach, "box-close": box})
    return {"both": str(tmp_path / "both_seed*.json"), "none": str(tmp_path / "none_seed*.json")}


def test_summary_per_seed_mean_std_and_verdicts(arms: dict[str, str]) -> None:
    table = summarize({name: load_arm(pattern) for name, pattern in arms.items()}, baseline="none")
    assert list(table) == ["reach", "box-close", "mean seen", "mean unseen"]
    reach = table["reach"]
    assert reach["both"]["seeds"] == [0.9, 0.8, 1.0]  # the agent's rows, not the expert's
    assert reach["both"]["mean"] == pytest.approx(0.9) and reach["both"]["std"] == pytest.approx(0.1)
    diff = reach["both - none"]
    assert diff["difference"] == pytest.approx(0.8) and diff["verdict"] == "supported"
    assert 0.6 < diff["ci95"][0] < 0.8 < diff["ci95"][1] < 1.0
    same = table["box-close"]["both - none"]  # identical arms
    assert same["difference"] == 0.0 and same["verdict"] == "not supported"
    assert same["ci95"][0] < 0 < same["ci95"][1]
    assert table["mean unseen"]["both"]["seeds"] == pytest.approx([0.2, 0.3, 0.1])


def test_one_seed_is_never_called_supported(tmp_path: Path) -> None:
    a = load_arm(str(_results(tmp_path / "a.json", {"reach": 50})))
    b = load_arm(str(_results(tmp_path / "b.json", {"reach": 0})))
    diff = summarize({"a": a, "b": b}, baseline="b")["reach"]["a - b"]
    assert diff["ci95"][0] > 0.9 and diff["verdict"] == "episodes only (1 seed)"


def test_bootstrap_is_seeded_and_keeps_uncertainty_at_zero_successes() -> None:
    arm, base = [[(4, 50)]], [[(0, 50)]]
    first, again = bootstrap_difference(arm, base), bootstrap_difference(arm, base)
    assert first == again and first[0] == pytest.approx(0.08)
    _, low, high = bootstrap_difference(base, base)  # 0 of 50 on both sides: still an interval
    assert low < 0 < high


def test_llmdpd_report_writes_markdown_json_and_png(
    arms: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    main(["report", "--protocol", "P3", "--arm", "both", arms["both"], "--arm", "none", arms["none"],
          "--baseline", "none", "--out", str(out)])  # fmt: skip
    text = (out / "report.md").read_text()
    assert text.startswith("**P3**")
    assert "| reach | 90.0 ± 10.0 (90, 80, 100) | 10.0 ± 10.0 (20, 10, 0) | +80.0 [" in text
    assert json.loads((out / "report.json").read_text())["protocol"] == "P3"
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip().endswith(str(out / "report.md"))


def test_llmdpd_report_rejects_what_it_cannot_read(
    arms: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["report", "--arm", "both", str(tmp_path / "nothing*.json")])
    assert info.value.code == 2 and "error: --arm: no results JSON matches" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", "--arm", "both", arms["both"], "--baseline", "none"])


def test_only_the_tasks_every_arm_ran_are_compared(tmp_path: Path) -> None:
    """An arm tested with ``--seen false`` lacks the seen tasks: the targets are still compared."""
    a = load_arm(str(_results(tmp_path / "a.json", {"reach": 50, "box-close": 40})))
    b = load_arm(str(_results(tmp_path / "b.json", {"box-close": 10})))
    table = summarize({"a": a, "b": b}, baseline="b")
    assert list(table) == ["box-close", "mean unseen"]
    assert table["box-close"]["a - b"]["difference"] == pytest.approx(0.6)
