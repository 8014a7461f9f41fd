"""benchmarks/ablation.py's time-boxed mode: the cut of concurrently trained variants to a step
that all of them validated and saved, and the command line its children get."""

import json
from pathlib import Path

import pytest

from benchmarks import ablation


def _fake_run(root: Path, name: str, validated: list[int], saved: list[int]) -> Path:
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    for step in saved:
        (run / "checkpoints" / str(step)).mkdir()
    (run / "checkpoints" / "7.orbax-checkpoint-tmp").mkdir()  # an interrupted save
    lines = []
    for step in range(10, max(validated + saved) + 1, 10):
        lines.append(json.dumps({"step": step, "train/loss": 1.0 / step}))
        if step in validated:
            lines.append(json.dumps({"step": step, "val/dice": step / 1000}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_cut_keeps_the_last_step_every_run_validated_and_saved(tmp_path):
    runs = {
        # validated at 60 but killed before its checkpoint finished: 40 is its last usable step
        "slow": _fake_run(tmp_path, "slow", validated=[20, 40, 60], saved=[20, 40]),
        "fast": _fake_run(tmp_path, "fast", validated=[20, 40, 60, 80], saved=[20, 40, 60, 80]),
    }
    assert ablation.cut_to_common_step(runs) == 40
    for run in runs.values():
        assert sorted(d.name for d in (run / "checkpoints").iterdir() if d.name.isdigit()) == [
            "20",
            "40",
        ]
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()]
        assert max(steps) == 40
    # the fast run's records up to the cut are all still there
    assert len((runs["fast"] / "metrics.jsonl").read_text().splitlines()) == 4 + 2


def test_cut_without_a_common_step_names_the_logs(tmp_path):
    runs = {
        "a": _fake_run(tmp_path, "a", validated=[20], saved=[20]),
        "b": _fake_run(tmp_path, "b", validated=[30], saved=[30]),
    }
    (runs["b"] / "train.log").write_text("RESOURCE_EXHAUSTED: out of memory")
    with pytest.raises(ValueError, match="no step was validated and saved.*out of memory"):
        ablation.cut_to_common_step(runs, "after 6 min")


def test_children_get_the_study_arguments_without_the_parents_own():
    argv = [
        "--config",
        "configs/brain.py",
        "--minutes",
        "6",
        "--variants",
        "ad-regnet-full",
        "u-net-baseline",
        "--real-pairs",
        "mni_to_scan",
        "--config.data.num_workers=2",
        "--image-size",
        "16",
        "16",
        "16",
    ]
    assert ablation._drop_option_values(
        argv, ("--variants", "--minutes", "--real-pairs", "--steps")
    ) == [
        "--config",
        "configs/brain.py",
        "--config.data.num_workers=2",
        "--image-size",
        "16",
        "16",
        "16",
    ]


def test_minutes_and_steps_together_are_refused(capsys):
    code = ablation.main(
        ["--config", "configs/demo.py", "--workdir", "x", "--minutes", "1", "--steps", "5"]
    )
    assert code == 1
    assert "--minutes decides the steps" in capsys.readouterr().err


def test_train_only_with_minutes_stops_after_the_cut(tmp_path, monkeypatch, capsys):
    cut = []
    monkeypatch.setattr(
        ablation, "train_concurrently", lambda argv, runs, minutes: cut.append(list(runs)) or 300
    )

    def no_training_or_evaluation(*args, **kwargs):
        raise AssertionError("--train-only trained again or evaluated after the cut")

    monkeypatch.setattr(ablation, "train_variant", no_training_or_evaluation)
    monkeypatch.setattr("adreg_jax.evaluation.evaluate_run", no_training_or_evaluation)
    argv = ["--config", "configs/demo.py", "--workdir", str(tmp_path), "--minutes", "1"]
    assert ablation.main([*argv, "--train-only"]) == 0
    assert len(cut) == 1 and len(cut[0]) == 5  # every variant trained, then cut
    assert "--steps 300" in capsys.readouterr().out
    assert not (tmp_path / "ablation.md").exists()
