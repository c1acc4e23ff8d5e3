"""Tools the test files share."""

import os
import subprocess
import sys

import torch
import transformers

# First lines of every Python subprocess a test starts: it must import the transformers this process runs (a
# relative PYTHONPATH and another working directory would silently give it a different one).
_SAME_TRANSFORMERS = (
    "import transformers as _transformers\n"
    "assert _transformers.__version__ == {version!r}, (\n"
    "    f'the subprocess imported transformers {{_transformers.__version__}} ({{_transformers.__file__}}), '\n"
    "    'the tests run {version}')\n"
)


def run_python(code=None, *, script=None, args=(), cwd, env=None, timeout=600):
    """Runs `code` (or `script` with `args`) in a new Python process with this process's environment plus `env`,
    in the folder `cwd`; returns the CompletedProcess (text output captured). The child checks that it imports the
    same transformers as the tests."""
    pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    relative = [p for p in pythonpath + [str(cwd)] if not os.path.isabs(p)]
    if relative:
        raise ValueError(f"paths handed to a subprocess must be absolute, got {relative}")
    if script is not None:
        argv = [str(script), *map(str, args)]  # as `python script args`: sys.path[0] is the script's folder
        code = (
            f"import runpy, sys\nsys.argv = {argv!r}\nsys.path[0] = {os.path.dirname(str(script))!r}\n"
            f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
        )
    prelude = _SAME_TRANSFORMERS.format(version=transformers.__version__)
    return subprocess.run(
        [sys.executable, "-c", prelude + code], cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
        text=True, timeout=timeout,
    )


def max_error_over_std(x, ref):
    """max |x - ref| / std(ref), in float64: the error against the official package (README: within 5e-5 for
    float32 logits)."""
    x, ref = x.double(), ref.double()
    return ((x - ref).abs().max() / ref.std()).item()


def relative_rms_error(x, ref):
    """||x - ref|| / ||ref||, in float64: the error of a kernel or of reduced precision against a reference."""
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all()
    return ((x - ref).norm() / ref.norm()).item()


def tiny_model(official=None, dtype=torch.float32, config=None, **weights):
    """A small RWKV7ForCausalLM in eval mode, on the random official-layout weights `official` (by default
    official.random_official_weights(**weights)), so that tests can run the official package on the same ones.
    config: RWKV7Config values beyond those the weights give (token ids, ...)."""
    from configuration_rwkv7 import RWKV7Config
    from modeling_rwkv7 import RWKV7ForCausalLM
    from official import random_official_weights, to_fla

    shape_config, state = to_fla(official if official is not None else random_official_weights(**weights))
    model = RWKV7ForCausalLM(RWKV7Config(**shape_config, **(config or {})))
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return model.to(dtype).eval()
