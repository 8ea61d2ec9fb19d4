"""Progress: the library reports its stages (convgraph.progress), the CLI shows them on stderr, and the
library never imports the CLI."""

from __future__ import annotations

import ast
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest

import convgraph
from convgraph import progress
from convgraph.run.bench import bench
from convgraph.engine.calibrate import calibrate
from convgraph.cli import main
from convgraph.cli import progress as shown_progress
from convgraph.engine.rewrite import rewrite
from convgraph.engine.verify import verify


class Recorder:
    """A reporter that keeps what it was told: ("start", name, total), ("advance", n), ("finish",)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def start(self, name, total=None):
        self.events.append(("start", name, total))

    def advance(self, n=1):
        self.events.append(("advance", n))

    def finish(self):
        self.events.append(("finish",))

    def started(self) -> dict[str, int | None]:
        return {e[1]: e[2] for e in self.events if e[0] == "start"}

    def advances(self, name: str) -> int:
        """How many advances the stage ``name`` got (its own, not its children's)."""
        depth, count, inside = 0, 0, False
        for e in self.events:
            if e[0] == "start":
                depth += 1
                if e[1] == name:
                    inside, base = True, depth
            elif e[0] == "finish":
                if inside and depth == base:
                    inside = False
                depth -= 1
            elif inside and depth == base:
                count += e[1]
        return count

    def balanced(self) -> bool:
        depth = 0
        for e in self.events:
            depth += {"start": 1, "finish": -1}.get(e[0], 0)
            if depth < 0:
                return False
        return depth == 0


def _stages(f, *args, **kwargs) -> Recorder:
    rec = Recorder()
    with progress.reporting(rec):
        f(*args, **kwargs)
    assert rec.balanced(), rec.events
    return rec


def test_stage_track_step_without_a_reporter_say_nothing(capsys):
    with progress.stage("a", 2) as s:
        s.advance()
        s.step("b")
    assert list(progress.track(range(3), "c")) == [0, 1, 2]
    assert capsys.readouterr() == ("", "")


def test_rewrite_reports_each_stage(models_dir):
    rec = _stages(rewrite, models_dir / "sample.onnx", ["fold-bn", "separable"], params={"rank": "full"},
                  inputs=None, input_options={"samples": 2}, bench=True, bench_runs=3)
    started = rec.started()
    for name in ("applying fold-bn", "applying separable", "checking the result (onnx.checker, shape inference)",
                 "verifying numerics", "comparing outputs", "benchmarking: 3 timed runs"):
        assert name in started, (name, started)
    assert started["comparing outputs"] == 2 and rec.advances("comparing outputs") == 2
    assert started["benchmarking: 3 timed runs"] == 3 and rec.advances("benchmarking: 3 timed runs") == 3


def test_verify_reports_samples_and_localizing(models_dir, tmp_path):
    out = tmp_path / "s.onnx"
    assert main(["rewrite", str(models_dir / "sample.onnx"), "--rule", "separable", "--no-verify", "--no-bench",
                 "-o", str(out)]) == 0
    rec = _stages(verify, models_dir / "sample.onnx", out, samples=3, localize=True)
    assert rec.started()["comparing outputs"] == 3 and rec.advances("comparing outputs") == 3
    assert "localizing" in rec.started()


def test_calibrate_reports_batches_unless_told_not_to(models_dir):
    sample = models_dir / "sample.onnx"
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 3, 64, 64)).astype(np.float32)} for i in range(4)]
    rec = _stages(calibrate, sample, feeds)
    assert rec.started() == {"calibrating": 4} and rec.advances("calibrating") == 4
    assert _stages(calibrate, sample, feeds, progress=False).events == []


def test_bench_progress_false_is_silent(models_dir):
    rec = _stages(bench, models_dir / "sample.onnx", runs=2, warmup=1)
    assert rec.started() == {"benchmarking: 1 warm-up runs": 1, "benchmarking: 2 timed runs": 2}
    assert _stages(bench, models_dir / "sample.onnx", runs=2, warmup=1, progress=False).events == []


def test_steps_are_sub_stages():
    rec = Recorder()
    with progress.reporting(rec), progress.stage("optimizing") as s:
        s.step("timing layers")
        s.step("calibrating")
    assert rec.events == [("start", "optimizing", None), ("start", "timing layers", None), ("finish",),
                          ("start", "calibrating", None), ("finish",), ("finish",)]


def test_lines_tell_slow_stages_only(capsys):
    lines = shown_progress.Lines(delay=0.2, remind=60, tick=0.01)
    lines.start("quick")
    lines.finish()
    lines.start("outer")
    lines.start("slow", 4)
    lines.advance(3)
    time.sleep(1.0)
    lines.finish()
    lines.finish()
    lines.close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("convgraph: outer › slow 3/4 [")


def test_live_display_clears_when_the_stages_end():
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=80)
    live = shown_progress.Live(console)
    with progress.reporting(live):
        for _ in progress.track(range(3), "counting"):
            pass
        assert live._progress is None  # stopped between stages: the command's tables print on a clean screen
        with progress.stage("again"):
            assert live._progress is not None
    live.close()
    assert "counting" in console.file.getvalue()


@pytest.fixture
def every_stage(monkeypatch):
    """Lines tell every stage at once (the CLI's delay hides the ones shorter than 2 s)."""
    monkeypatch.setattr(shown_progress, "DELAY_S", 0.0)


def test_cli_off_a_terminal_writes_one_line_per_stage(models_dir, tmp_path, capsys, every_stage):
    out = tmp_path / "s.onnx"
    code = main(["rewrite", str(models_dir / "sample.onnx"), "--rule", "fold-bn", "--rule", "separable", "--param",
                 "rank=full", "--runs", "2", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0
    told = [ln.split(" [")[0] for ln in captured.err.splitlines()]
    assert told[:4] == ["convgraph: applying fold-bn", "convgraph: applying separable",
                        "convgraph: checking the result (onnx.checker, shape inference)",
                        "convgraph: verifying numerics"]
    assert "convgraph: verifying numerics › comparing outputs 0/1" in told
    assert "convgraph: benchmarking: 2 timed runs 0/2" in told
    assert "convgraph:" not in captured.out  # progress never goes to stdout

    code = main(["verify", str(models_dir / "sample.onnx"), str(out), "--samples", "2", "--json"])
    captured = capsys.readouterr()
    assert code == 0 and json.loads(captured.out)["passed"] is True  # --json: stdout is still one document
    assert [ln.split(" [")[0] for ln in captured.err.splitlines()] == ["convgraph: comparing outputs 0/2"]


def test_cli_optimize_off_a_terminal_tells_its_steps(models_dir, tmp_path, capsys, every_stage):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((6, 3, 64, 64)).astype(np.float32))
    code = main(["optimize", str(models_dir / "sample.onnx"), "--calib", str(tmp_path / "calib.npz"), "--budget",
                 "0.5", "--rules", "separable", "--ranks", "1", "--max-evals", "1", "-o", str(tmp_path / "o.onnx"),
                 "--json"])
    told = [ln.split(" [")[0] for ln in capsys.readouterr().err.splitlines()]
    assert code in (0, 1)
    assert told[:2] == ["convgraph: optimizing", "convgraph: optimizing › timing layers"]
    assert "convgraph: optimizing › calibrating" in told


def _imports_cli(path: Path) -> bool:
    """Whether the module at ``path`` imports ``convgraph.cli`` (absolute or relative), read with ast."""
    package = ["convgraph", *path.relative_to(Path(convgraph.__file__).parent).parts[:-1]]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        if any(n == "convgraph.cli" or n.startswith("convgraph.cli.") for n in names):
            return True
    return False


def test_the_library_never_imports_the_cli():
    root = Path(convgraph.__file__).parent
    library = [p for p in root.rglob("*.py") if "cli" not in p.relative_to(root).parts[:-1]]
    assert _imports_cli(root / "__main__.py")  # the check sees a real import (the `python -m` entry point)
    offenders = [str(p.relative_to(root)) for p in library if p.name != "__main__.py" and _imports_cli(p)]
    assert offenders == []
