"""Every benchmark explains itself (--help) and, without what it needs, says so instead of failing with a traceback."""

import argparse
import runpy
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "needs.py")
GPU_SCRIPTS = {"bench_generate.py", "bench_kernels.py", "bench_linear_row.py", "bench_train.py", "profile_decode.py"}


def run(script, *args, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / script), *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    return exit_info.value.code


def test_the_gpu_list_is_complete():
    assert GPU_SCRIPTS < set(SCRIPTS) and {"bench_cpu_decode.py", "bench_tokenizer.py"} < set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_describes_the_benchmark_and_each_option(script, monkeypatch, capsys):
    assert run(script, "--help", monkeypatch=monkeypatch) == 0
    assert capsys.readouterr().out.startswith("usage:")

    parsers = []

    def capture(parser, *args, **kwargs):
        parsers.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    run(script, monkeypatch=monkeypatch)
    (parser,) = parsers
    assert parser.description and len(parser.description.splitlines()) >= 2
    for action in parser._actions:
        assert action.help, (script, action.dest)


@pytest.mark.parametrize("script", sorted(GPU_SCRIPTS))
def test_gpu_benchmarks_say_they_need_a_gpu(script, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = run(script, monkeypatch=monkeypatch)
    assert isinstance(message, str) and f"{script} times CUDA kernels and needs a CUDA GPU" in message
