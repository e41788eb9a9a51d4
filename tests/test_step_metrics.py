"""Per-step metrics (torchrec_esd.apps.step_metrics): a short spawned run
writes valid JSON lines with the documented keys; logging is rank-prefixed."""

import io
import json
import logging
import os

import pytest

from torchrec_esd.apps.launch import run_local_world
from torchrec_esd.apps.step_metrics import ESD_METRIC_KEYS, METRIC_KEYS, require_tensorboard
from torchrec_esd.apps.workload import SyntheticWorkloadConfig
from torchrec_esd.config import EsdConfig, EsdConfigError, heterogeneous_workers
from torchrec_esd.log import configure_logging, set_role
from torchrec_esd.metrics import KINDS

STEPS = 4


def _jobs(path: str):
    from torchrec_esd.apps.trainer import JobConfig, run

    wl = SyntheticWorkloadConfig(num_sparse=3, cardinalities=[40, 200, 70], bag_size=(1, 3), seed=5)
    cache = {f"t_cat_{i}": 8 for i in range(3)}
    esd = EsdConfig(heterogeneous_workers([100.0, 10.0], cache, latency_ms=1.0), num_ps=1)
    base = dict(steps=STEPS, global_batch=32, workload=wl, esd=esd, metrics_jsonl=path)
    run(JobConfig(method="vanilla", **base))
    return run(JobConfig(method="esd", dispatcher="hybrid", dispatch_ahead=1, **base))


def test_spawned_run_writes_documented_json_lines(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    results = run_local_world(_jobs, 3, path, timeout_s=240)
    with open(path) as f:
        records = [json.loads(line) for line in f]
    assert [r["job"] for r in records] == ["vanilla"] * STEPS + ["esd:hybrid"] * STEPS
    for r in records:
        assert set(METRIC_KEYS) <= set(r)
        assert r["iter_ms"] > 0 and r["loss"] > 0
    esd = [r for r in records if r["job"] == "esd:hybrid"]
    assert [r["step"] for r in esd] == list(range(STEPS))
    # the losses are the job's own, and the per-step bytes add up to the job's totals
    assert [r["loss"] for r in esd] == pytest.approx(results[0]["losses"])
    # dispatched ahead: every step says how long the training thread waited for its batch's dispatch
    waits = [d["wait_ms"] for d in results[0]["decisions"]]
    assert len(waits) == STEPS and all(0.0 <= w < 240e3 for w in waits), waits
    totals = results[0]["metrics"]["per_worker"]
    for r in esd:
        assert set(ESD_METRIC_KEYS) <= set(r)
        assert r["solver"] and r["dispatch_ms"] >= 0
        assert [w["worker"] for w in r["workers"]] == [0, 1]
        assert [w["bandwidth_mbps"] for w in r["workers"]] == [100.0, 10.0]
        assert r["link_s_max"] == max(w["link_s"] for w in r["workers"])
        for w in r["workers"]:
            assert set(w["bytes"]) == set(KINDS) and set(w["rows"]) == set(KINDS)
    # the job's totals are taken after the final flush, which pushes the dirty
    # cached rows outside any step: every pull kind adds up exactly
    for w in range(2):
        for kind in KINDS:
            per_step = sum(r["workers"][w]["bytes"][kind] for r in esd)
            if kind.endswith("_push"):
                assert per_step <= totals[w]["bytes"][kind]
            else:
                assert per_step == totals[w]["bytes"][kind], kind
        assert sum(r["workers"][w]["link_s"] for r in esd) <= totals[w]["link_s"] + 1e-12
    assert sum(sum(r["workers"][1]["bytes"].values()) for r in esd) > 0


def test_tensorboard_missing_is_a_clear_error():
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(EsdConfigError, match="tensorboard package is not installed"):
            require_tensorboard()
    else:
        require_tensorboard()


def test_example_rejects_tensorboard_without_the_package(capsys):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("dlrm_esd_example_tb", os.path.join(root, "examples/dlrm_esd.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with pytest.raises(SystemExit) as info:
        example.parse_args(["--tensorboard", "tb"])
    assert info.value.code == 2
    assert "tensorboard package is not installed" in capsys.readouterr().err


def test_log_records_carry_rank_and_role(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    stream = io.StringIO()
    handler = configure_logging("INFO", stream=stream)
    try:
        set_role("ps")
        logging.getLogger("torchrec_esd.distributed.runtime").info("serving %d tables", 26)
        logging.getLogger("torchrec_esd.distributed.runtime").debug("not shown")
        assert stream.getvalue() == "[rank 3 ps] INFO torchrec_esd.distributed.runtime: serving 26 tables\n"
        with pytest.raises(ValueError, match="unknown log level"):
            configure_logging("LOUD")
    finally:
        set_role(None)
        logging.getLogger("torchrec_esd").removeHandler(handler)
        logging.getLogger("torchrec_esd").propagate = True
        logging.getLogger("torchrec_esd").setLevel(logging.NOTSET)


def test_package_code_does_not_print():
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "torchrec_esd")
    offenders = []
    for d, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(d, name)) as f:
                    for i, line in enumerate(f, 1):
                        if line.lstrip().startswith("print("):
                            offenders.append(f"{name}:{i}")
    assert not offenders, f"print() in the package (use logging): {offenders}"


def _plot_script():
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("plot_metrics", os.path.join(root, "scripts/plot_metrics.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plot_script_summarises_and_skips_the_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    import sys

    rec = {"job": "esd:hybrid", "step": 0, "loss": 0.7, "iter_ms": 12.0, "dispatch_ms": 1.5, "solver": "exact",
           "link_s_max": 0.02, "workers": [{"worker": 0, "bytes": {"miss_pull": 1000}, "link_s": 0.01},
                                           {"worker": 1, "bytes": {"miss_pull": 3000}, "link_s": 0.02}]}
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "step": 1, "loss": 0.6}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert _plot_script().main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "esd:hybrid" in out and "final loss 0.6000" in out and "per worker MB 0.00/0.01" in out
    assert "matplotlib is not installed: no plot" in out
    path.write_text("{not json\n")
    with pytest.raises(SystemExit, match="m.jsonl:1: not a metrics record"):
        _plot_script().main([str(path)])


def _steady_jobs():
    from torchrec_esd.apps.trainer import JobConfig, run

    wl = SyntheticWorkloadConfig(num_sparse=3, cardinalities=[40, 200, 70], bag_size=(1, 3), seed=5)
    cache = {f"t_cat_{i}": 8 for i in range(3)}
    esd = EsdConfig(heterogeneous_workers([100.0, 10.0], cache, latency_ms=1.0), num_ps=1)
    base = dict(global_batch=32, workload=wl, esd=esd, method="esd", dispatcher="laia")
    return {"long": run(JobConfig(steps=7, steady_from_step=3, **base)),
            "first": run(JobConfig(steps=3, **base)),
            "from0": run(JobConfig(steps=3, steady_from_step=0, **base)),
            "short": run(JobConfig(steps=2, steady_from_step=3, **base))}


def test_steady_metrics_are_the_steps_after_the_warm_up():
    # the traffic of steps 3..6 of a 7-step job is its traffic before the final flush
    # less what a 3-step job of the same batches and dispatch moved before its flush
    res = run_local_world(_steady_jobs, 3, timeout_s=240)
    for r in res[:2]:  # every worker reports the same gathered figures
        long, first = r["long"], r["first"]
        steady, total, warm = long["metrics_steady"], long["metrics_before_flush"], first["metrics_before_flush"]
        assert steady["rows"]["miss_pull"] > 0 and steady["total_link_s"] > 0
        for w in range(2):
            s, t, f = steady["per_worker"][w], total["per_worker"][w], warm["per_worker"][w]
            assert s["iterations"] == 4 and f["iterations"] == 3
            for kind in KINDS:
                assert s["rows"][kind] == t["rows"][kind] - f["rows"][kind]
                assert s["bytes"][kind] == t["bytes"][kind] - f["bytes"][kind]
            assert s["link_s"] == pytest.approx(t["link_s"] - f["link_s"], rel=1e-12)
        assert steady["total_link_s"] < total["total_link_s"]
        # from step 0: everything before the flush; a job that ended before the warm-up: none
        assert r["from0"]["metrics_steady"] == r["from0"]["metrics_before_flush"]
        assert r["short"]["metrics_steady"] is None
    assert res[2] == {"long": {"role": "ps"}, "first": {"role": "ps"}, "from0": {"role": "ps"},
                      "short": {"role": "ps"}}


def test_meter_difference_refuses_snapshots_out_of_order():
    from torchrec_esd.metrics import TransmissionMeter

    a = {"rows": {"miss_pull": 5}, "link_s": 1.0, "iterations": 2}
    b = {"rows": {"miss_pull": 7}, "link_s": 1.5, "iterations": 3}
    assert TransmissionMeter.difference(b, a) == {"rows": {"miss_pull": 2}, "link_s": 0.5, "iterations": 1}
    with pytest.raises(ValueError, match="out of order"):
        TransmissionMeter.difference(a, b)


def test_negative_steady_from_step_is_refused_before_anything_runs():
    from torchrec_esd.apps.esd_job import _esd
    from torchrec_esd.apps.trainer import JobConfig

    with pytest.raises(EsdConfigError, match="steady_from_step must be >= 0, got -1"):
        _esd(JobConfig(method="esd", steady_from_step=-1), None)
