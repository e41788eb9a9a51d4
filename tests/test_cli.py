"""Command lines a newcomer runs: a dispatcher typo fails while parsing, and
the end-to-end benchmark writes its table without matplotlib."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(relpath: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_rejects_an_unknown_dispatcher_while_parsing(capsys):
    example = _load("examples/dlrm_esd.py", "dlrm_esd_example")
    assert example.parse_args(["--dispatchers", "hybrid,laia"]).dispatchers == ["hybrid", "laia"]
    with pytest.raises(SystemExit) as info:
        example.parse_args(["--dispatchers", "hybrid,hybird"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown dispatcher(s) ['hybird']" in err and "heuristic" in err


def test_example_prefetch_depth_needs_dispatch_ahead(capsys):
    example = _load("examples/dlrm_esd.py", "dlrm_esd_example")
    assert example.parse_args(["--dispatch-ahead", "2", "--prefetch-depth", "2"]).prefetch_depth == 2
    with pytest.raises(SystemExit) as info:
        example.parse_args(["--dispatch-ahead", "1", "--prefetch-depth", "2"])
    assert info.value.code == 2 and "<= --dispatch-ahead" in capsys.readouterr().err


def test_end_to_end_plot_is_skipped_without_matplotlib(monkeypatch, tmp_path, capsys):
    e2e = _load("benchmarks/end_to_end.py", "end_to_end_benchmark")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    png = tmp_path / "plot.png"
    assert e2e.plot({}, str(png), "modelled") is False
    assert not png.exists()
    assert "matplotlib is not installed: no plot" in capsys.readouterr().out



def test_every_example_option_is_explained(monkeypatch):
    import argparse

    example = _load("examples/dlrm_esd.py", "dlrm_esd_example_help")
    seen = []
    orig = argparse.ArgumentParser.parse_args

    def spy(self, *a, **k):
        seen.extend(self._actions)
        return orig(self, *a, **k)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    example.parse_args([])
    assert "--dispatchers" in [o for a in seen for o in a.option_strings] and len(seen) > 15
    missing = [a.option_strings for a in seen if not (a.help and a.help.strip())]
    assert not missing, f"options without help: {missing}"
