"""The package loads through transformers' remote code from a local folder, from a Hub repo id (an on-disk Hugging
Face cache, offline) and straight from this source checkout, and finds its kernels/ folder each time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from hub_cache import add_repo_to_cache
from official import REPO, random_official_weights, to_fla, write_model_dir
from transformers import AutoModelForCausalLM

from configuration_rwkv7 import RWKV7Config
from modeling_rwkv7 import RWKV7ForCausalLM

TOKENS = [[3, 14, 15, 92, 65, 35, 89, 79]]

PROBE = """
import json, sys, torch
if {block_triton}:
    sys.modules["triton"] = None  # as on a machine without triton: importing it raises ImportError
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({source!r}, trust_remote_code=True, **{kwargs!r})
modeling = sys.modules[type(model).__module__]
with torch.no_grad():
    logits = model(torch.tensor({tokens!r})).logits
print(json.dumps({{"logits": logits.tolist(), "module": type(model).__module__,
                  "kernels": modeling.kernels.__file__, "has_triton": modeling.kernels.HAS_TRITON}}))
"""


def run_probe(source, env, block_triton=False, **kwargs):
    code = PROBE.format(source=str(source), kwargs=kwargs, tokens=TOKENS, block_triton=block_triton)
    result = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, cwd="/"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def expected_logits(official):
    config, state = to_fla(official)
    model = RWKV7ForCausalLM(RWKV7Config(**config))
    model.load_state_dict(state)
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits


def test_local_folder_imports_its_own_kernels(tmp_path):
    official = random_official_weights(hidden=128, layers=2, seed=11)
    folder = write_model_dir(tmp_path / "local_model", official)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    modeling = sys.modules[type(model).__module__]
    assert type(model).__module__.startswith("transformers_modules.")
    assert Path(modeling.kernels.__file__).parent == folder / "kernels"
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor(TOKENS)).logits, expected_logits(official))


def test_hub_repo_id_from_offline_cache_uses_kernels_of_the_same_commit(tmp_path):
    official = random_official_weights(hidden=128, layers=2, seed=12)
    old = write_model_dir(tmp_path / "old", official, pack_x_x=True)  # an older upload, in the packed layout
    new = write_model_dir(tmp_path / "new", official)
    # the newer commit's kernels differ: loading the old commit must not pick them up
    with open(new / "kernels" / "__init__.py", "a") as f:
        f.write("\nraise ImportError('kernels of the newer commit were imported')\n")
    cache = tmp_path / "hub"
    old_commit = add_repo_to_cache(cache, "rwkv-test/tiny", old)
    new_commit = add_repo_to_cache(cache, "rwkv-test/tiny", new)  # refs/main -> new
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}

    result = run_probe("rwkv-test/tiny", env, revision=old_commit)
    assert f"snapshots/{old_commit}/kernels/__init__.py" in result["kernels"]
    torch.testing.assert_close(torch.tensor(result["logits"]), expected_logits(official))

    failed = subprocess.run(
        [sys.executable, "-c", PROBE.format(source="rwkv-test/tiny", kwargs={}, tokens=TOKENS, block_triton=False)],
        env={**os.environ, **env}, capture_output=True, text=True, cwd="/",
    )
    assert failed.returncode != 0 and "kernels of the newer commit were imported" in failed.stderr
    assert new_commit != old_commit


def test_source_checkout_import_and_no_triton_needed(tmp_path):
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, modeling_rwkv7\n"
        "from configuration_rwkv7 import RWKV7Config\n"
        "m = modeling_rwkv7.RWKV7ForCausalLM(RWKV7Config(vocab_size=50, hidden_size=64, num_hidden_layers=1, "
        "head_dim=32, decay_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8, gate_low_rank_dim=8))\n"
        "print(m(torch.tensor([[1, 2, 3]])).logits.shape, modeling_rwkv7.kernels.__file__, modeling_rwkv7.kernels.HAS_TRITON)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"torch.Size([1, 3, 50]) {REPO / 'kernels' / '__init__.py'} False" in result.stdout

    official = random_official_weights(hidden=128, layers=1, seed=13)
    folder = write_model_dir(tmp_path / "no_triton", official)
    result = run_probe(folder, {"HF_MODULES_CACHE": str(tmp_path / "modules")}, block_triton=True)
    assert result["has_triton"] is False
    torch.testing.assert_close(torch.tensor(result["logits"]), expected_logits(official))
