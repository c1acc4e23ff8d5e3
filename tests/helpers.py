"""Tools the test files share."""

import os
import subprocess
import sys

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
