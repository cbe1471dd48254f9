"""Config, run directories, resumable stages, results and the paper comparison."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from common.compare import comparison, render
from common.config import freeze_run_config, load_config, parse_overrides
from common.errors import UserError
from common.io import atomic_path, remove_interrupted_writes
from common.results import METRIC_COLUMNS, write_metrics, write_summary
from common.runs import Stage, cycle_dir

CONFIG = {"base": {"lr": 0.1, "sae": {"d_sae": 8, "l1": 0.5}, "name": "x"},
          "presets": {"faithful": {}, "corrected": {"sae": {"l1": 0.25}}}}


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def test_a_run_config_reads_by_attribute_and_is_read_only(config_file, tmp_path):
    """Stages get the run's config as a common.config.Config: cfg.sae.d_sae; a name it lacks is an
    error naming the dotted key; no value can be changed; it writes back as the same YAML/JSON."""
    import copy
    import pickle

    from common.config import Config, load_run_config
    from common.io import write_json, write_yaml

    run = tmp_path / "run"
    freeze_run_config(run, load_config(config_file, "corrected"))
    cfg = load_run_config(run)
    assert isinstance(cfg, Config) and isinstance(cfg.sae, Config)
    assert cfg.sae.l1 == 0.25 and cfg["sae"]["l1"] == 0.25 and cfg.preset == "corrected"
    assert "sae" in cfg and cfg.get("missing", 7) == 7 and dict(cfg.sae) == {"d_sae": 8, "l1": 0.25}
    with pytest.raises(AttributeError, match="no key 'sae.l2'"):
        cfg.sae.l2
    with pytest.raises(AttributeError, match="read-only.*'sae.l1'"):
        cfg.sae.l1 = 1.0
    with pytest.raises(TypeError):
        cfg["lr"] = 1.0
    assert cfg.to_dict() == yaml.safe_load((run / "config.yaml").read_text())
    assert pickle.loads(pickle.dumps(cfg)).to_dict() == copy.deepcopy(cfg).to_dict() == cfg.to_dict()
    write_yaml(tmp_path / "again.yaml", cfg)
    write_json(tmp_path / "again.json", {"sae": cfg.sae})
    assert yaml.safe_load((tmp_path / "again.yaml").read_text()) == cfg.to_dict()
    assert json.loads((tmp_path / "again.json").read_text()) == {"sae": {"d_sae": 8, "l1": 0.25}}
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.yaml").write_text("- 1\n")
    with pytest.raises(UserError, match="not a resolved run config"):
        load_run_config(tmp_path / "list")


def test_presets_and_overrides(config_file):
    assert load_config(config_file)["sae"]["l1"] == 0.5
    cfg = load_config(config_file, "corrected", parse_overrides(["--sae.d_sae", "16", "--lr=1e-3"]))
    assert cfg["sae"] == {"d_sae": 16, "l1": 0.25} and cfg["lr"] == 1e-3 and cfg["preset"] == "corrected"


@pytest.mark.parametrize("call,match", [
    (lambda p: load_config(p, "fast"), "unknown preset"),
    (lambda p: load_config(p, "faithful", {"sae.l2": 1}), "unknown config key 'sae.l2'"),
    (lambda p: load_config(p.parent / "missing.yaml"), "not found"),
    (lambda p: parse_overrides(["--lr"]), "no value"),
    (lambda p: parse_overrides(["lr", "1"]), "unexpected argument"),
])
def test_config_errors(config_file, call, match):
    with pytest.raises(UserError, match=match):
        call(config_file)


def test_resuming_with_other_settings_is_refused(config_file, tmp_path):
    run = tmp_path / "run"
    freeze_run_config(run, load_config(config_file))
    freeze_run_config(run, load_config(config_file))        # same settings: fine
    with pytest.raises(UserError, match="sae.l1"):
        freeze_run_config(run, load_config(config_file, "corrected"))


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_run_removes_what_killed_writes_left(config_file, tmp_path):
    """A SIGKILL mid-write leaves atomic_path's temporary file (no finally runs); the next init of the
    run removes every such file, and nothing else."""
    run_dir = tmp_path / "run"
    init = [sys.executable, "-m", "common.runs", "--config", str(config_file), "--out", str(run_dir)]
    subprocess.run(init, check=True, capture_output=True)
    deep = run_dir / "seed_42" / "cycle_3"
    deep.mkdir(parents=True)
    left = [deep / ".sae_h2.safetensors.yv0gje6g.tmp", run_dir / ".summary.csv.abc.tmp"]
    for path in left:
        path.write_text("half")
    kept = [deep / "mlp.safetensors", deep / "notes.tmp.txt"]
    for path in kept:
        path.write_text("whole")
    out = subprocess.run(init, check=True, capture_output=True, text=True).stdout
    assert "removed 2 temporary file(s)" in out
    assert not any(path.exists() for path in left) and all(path.exists() for path in kept)
    assert remove_interrupted_writes(run_dir) == 0


def toy_pipeline(run, fail_after=None):
    """Two stages; the second reads the first. Returns the final value."""
    directory = cycle_dir(run, 42, 0)
    first = Stage(directory, "first")
    if not first.done():
        (directory / "a.txt").parent.mkdir(parents=True, exist_ok=True)
        (directory / "a.txt").write_text("21")
        first.finish([directory / "a.txt"])
        if fail_after == "first":
            raise KeyboardInterrupt
    second = Stage(directory, "second")
    if not second.done():
        first.require_done("run the first stage")
        (directory / "b.txt").write_text(str(2 * int((directory / "a.txt").read_text())))
        second.finish([directory / "b.txt"])
    return (directory / "b.txt").read_text()


def test_interrupted_run_resumes_with_the_same_result(tmp_path):
    assert toy_pipeline(tmp_path / "once") == "42"
    with pytest.raises(KeyboardInterrupt):
        toy_pipeline(tmp_path / "twice", fail_after="first")
    a = tmp_path / "twice" / "seed_42" / "cycle_0" / "a.txt"
    mtime = a.stat().st_mtime_ns
    assert toy_pipeline(tmp_path / "twice") == "42"
    assert a.stat().st_mtime_ns == mtime                       # the finished stage was not redone


def test_stage_with_damaged_output_is_not_done(tmp_path):
    stage = Stage(tmp_path, "s")
    (tmp_path / "x.bin").write_bytes(b"12345")
    stage.finish([tmp_path / "x.bin"])
    assert stage.done()
    (tmp_path / "x.bin").write_bytes(b"12")
    assert not stage.done()
    with pytest.raises(UserError, match="no finished 's' stage"):
        stage.require_done("run it")


def _finish(stage, content="x"):
    stage.directory.mkdir(parents=True, exist_ok=True)
    (stage.directory / f"{stage.name}.txt").write_text(content)
    stage.finish([stage.directory / f"{stage.name}.txt"])


def test_a_rerun_stage_makes_what_was_built_on_it_stale(tmp_path):
    a = Stage(tmp_path / "c0", "a")
    b = Stage(tmp_path / "c1", "b", [a])
    c = Stage(tmp_path / "c1", "c", [b])
    for stage in (a, b, c):
        _finish(stage)
    assert a.done() and b.done() and c.done()
    _finish(a, "other inputs")                      # a finished again: b and c were built on the old one
    assert a.done() and not b.done() and not c.done()
    with pytest.raises(UserError, match="stages it was built from"):
        c.require_done("run b and c again")
    _finish(b)
    assert b.done() and not c.done()                # c still holds the old b
    _finish(c)
    assert c.done()
    d = Stage(tmp_path / "c1", "d", [a, c])
    _finish(d)
    (tmp_path / "c0" / "a.txt").write_text("damaged")   # a's output changed: everything on it is not done
    assert not a.done() and not c.done() and not d.done()


def test_markers_without_recorded_inputs_are_trusted(tmp_path):
    """Markers written before stages recorded their inputs (no 'after' key) keep counting as done."""
    a = Stage(tmp_path, "a")
    _finish(a)
    b = Stage(tmp_path, "b", [a])
    _finish(b)
    record = json.loads(b.marker.read_text())
    del record["after"], record["token"]
    b.marker.write_text(json.dumps(record))
    _finish(a, "again")
    assert b.done()


def test_decoupled_stage_graph_follows_requires(tmp_path):
    from common.decoupled import GRAPH, REQUIRES, STAGES  # the decoupled GRAPH (common.runs.StageGraph)

    def at(name, cycle):
        return GRAPH.stage(tmp_path / f"cycle_{cycle}", name)

    for cycle in (0, 1):
        for name in STAGES:
            _finish(at(name, cycle))
    assert all(at(name, 1).done() for name in STAGES)
    assert {(s.name, s.directory.name) for s in at("adapt", 1).after} == {("adapt", "cycle_0"), ("sharpen", "cycle_0")}
    assert not at("adapt", 0).after and len(at("metrics", 1).after) == len(REQUIRES["metrics"])
    _finish(at("sharpen", 0))                       # new cycle-0 targets: all of cycle 1 is stale
    assert at("metrics", 0).done() and not any(at(name, 1).done() for name in STAGES)


def fake_run(run, values):
    for seed, acc in values:
        metrics = {c: 0.5 for c in METRIC_COLUMNS}
        metrics["acc"] = acc
        write_metrics(cycle_dir(run, seed, 0) / "metrics.json", experiment="DIGIT-MNIST", seed=seed, cycle=0,
                      metrics=metrics)
    return write_summary(run)


def test_summary_and_comparison(tmp_path):
    path = fake_run(tmp_path, [(42, 91.0), (43, 92.0)])
    frame = pd.read_csv(path)
    assert list(frame.columns[:3]) == ["experiment", "seed", "cycle"]
    assert set(METRIC_COLUMNS) <= set(frame.columns)
    table = comparison([frame])
    cell = table[(table.experiment == "DIGIT-MNIST") & (table.cycle == 0) & (table.metric == "acc")].iloc[0]
    assert cell.paper == 91.11 and cell.ours == 91.5 and cell.n == 2
    assert cell.sd == pytest.approx(0.7071067811865476) and cell["diff"] == pytest.approx(91.5 - 91.11)
    text = render(table)
    assert "91.50 ± 0.71" in text and "+0.39" in text


def test_comparison_before_any_run_lists_every_published_cell():
    table = comparison()
    assert len(table) == 162 and table["ours"].isna().all()
    text = render(table)
    for title in ("Table 1", "Table 2", "Table 3", "Table 4", "Table 5", "Table 10"):
        assert title in text


def test_metrics_must_have_every_column(tmp_path):
    with pytest.raises(UserError, match="lack"):
        write_metrics(tmp_path / "m.json", experiment="x", seed=42, cycle=0, metrics={"acc": 1.0})


def test_compare_cli(tmp_path):
    path = fake_run(tmp_path, [(42, 91.0)])
    ok = subprocess.run([sys.executable, "-m", "common.compare", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0 and "91.00" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "common.compare", str(tmp_path / "nope.csv")],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: summary")


def test_notebook_summaries_env_defaults_and_errors(tmp_path, monkeypatch):
    from common.errors import UserError
    from common.results import SUMMARY_ENV, notebook_summaries

    exp = tmp_path / "EXP"
    monkeypatch.delenv(SUMMARY_ENV, raising=False)
    with pytest.raises(UserError, match="run EXP/run.sh first"):
        notebook_summaries(exp)
    (exp / "runs" / "faithful").mkdir(parents=True)
    (exp / "runs" / "faithful" / "summary.csv").write_text("experiment,seed,cycle\n")
    assert notebook_summaries(exp) == [exp / "runs" / "faithful" / "summary.csv"]
    for preset in ("faithful", "corrected"):                    # committed results come first
        (exp / "results" / preset).mkdir(parents=True)
        (exp / "results" / preset / "summary.csv").write_text("experiment,seed,cycle\n")
    assert [p.parent.name for p in notebook_summaries(exp)] == ["corrected", "faithful"]
    assert notebook_summaries(exp)[0].parent.parent.name == "results"
    other = tmp_path / "other.csv"
    other.write_text("experiment,seed,cycle\n")
    monkeypatch.setenv(SUMMARY_ENV, f"{other}{os.pathsep}{exp / 'runs' / 'faithful'}")   # a file and a run dir
    assert notebook_summaries(exp) == [other, exp / "runs" / "faithful" / "summary.csv"]
    monkeypatch.setenv(SUMMARY_ENV, str(tmp_path / "nowhere.csv"))
    with pytest.raises(UserError, match="nowhere.csv, which does not exist"):
        notebook_summaries(exp)


def test_lane_runs_scripts_in_order_waits_and_stops_on_failure(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text("import sys\nfrom helper import note\nnote(sys.argv[1])\n"
                      "if sys.argv[1] == 'fail':\n    print('error: it failed', file=sys.stderr); sys.exit(2)\n")
    (tmp_path / "helper.py").write_text(f"def note(word):\n    open({str(tmp_path / 'log')!r}, 'a').write(word + ' ')\n")
    (tmp_path / "marker").write_text("")
    lane = [sys.executable, "-m", "common.lane"]
    ok = subprocess.run([*lane, "--", f"{script} one", f"@after {tmp_path / 'marker'}", f"{script} 'two words'"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "log").read_text() == "one two words "
    failed = subprocess.run([*lane, "--", f"{script} fail", f"{script} never"], capture_output=True, text=True)
    assert failed.returncode == 2 and failed.stderr.strip() == "error: it failed"
    assert "never" not in (tmp_path / "log").read_text()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()                                   # the lane that would write the marker has ended
    orphan = subprocess.run([*lane, "--watch", str(gone.pid), "--", f"@after {tmp_path / 'never.done'}",
                             f"{script} never"], capture_output=True, text=True, timeout=60)
    assert orphan.returncode == 1 and "never" not in (tmp_path / "log").read_text()
    for bad, says in (([f"{tmp_path / 'missing.py'} x"], "no script"), (["@after"], "takes one path")):
        result = subprocess.run([*lane, "--", *bad], capture_output=True, text=True)
        assert result.returncode == 2 and says in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_marker_alone_tells_whether_its_stage_is_current(tmp_path):
    """Stage.from_marker rebuilds the inputs a marker recorded; a lane's '@after' waits past a stale one."""
    a = Stage(tmp_path / "c0", "a")
    b = Stage(tmp_path / "c1", "b", [a])
    _finish(a)
    _finish(b)
    seen = Stage.from_marker(b.marker)
    assert [s.marker for s in seen.after] == [a.marker] and seen.done()
    _finish(a, "again")                           # b is now built on an old a
    assert not Stage.from_marker(b.marker).done()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lane = subprocess.run([sys.executable, "-m", "common.lane", "--watch", str(gone.pid), "--", f"@after {b.marker}"],
                          capture_output=True, text=True, timeout=60)
    assert lane.returncode == 1                   # not released by the stale marker
    _finish(b)
    lane = subprocess.run([sys.executable, "-m", "common.lane", "--", f"@after {b.marker}"],
                          capture_output=True, text=True, timeout=60)
    assert lane.returncode == 0, lane.stderr


def test_one_stage_graph_serves_cycles_and_other_folders(tmp_path):
    from common.runs import StageGraph, cycle_of

    graph = StageGraph({"train": [(-1, "sharpen")], "sharpen": [(0, "train")], "metrics": [(0, "train")]})
    seed = tmp_path / "seed_42"
    assert [(s.directory.name, s.name) for s in graph.stage(seed / "cycle_2", "train").after] == [("cycle_1", "sharpen")]
    assert graph.stage(seed / "cycle_0", "train").after == [] and graph.stage(seed / "random_targets", "train").after == []
    metrics = graph.stage(seed / "cycle_1", "metrics")
    assert graph.missing(metrics).name == "train"
    _finish(graph.stage(seed / "cycle_0", "train"))
    _finish(graph.stage(seed / "cycle_0", "sharpen"))
    _finish(graph.stage(seed / "cycle_1", "train"))
    assert graph.missing(graph.stage(seed / "cycle_1", "metrics")) is None
    assert cycle_of(seed / "cycle_12") == 12 and cycle_of(seed / "random_targets") is None
    with pytest.raises(UserError, match="does not define: sae"):
        StageGraph({"train": [(0, "sae")]})
