"""The package loads through transformers' remote code from a local folder, from a Hub repo id (an on-disk Hugging
Face cache, offline) and straight from this source checkout, and finds its rwkv7_kernels/ folder each time."""

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers import run_python
from hub_cache import add_repo_to_cache
from official import REPO, random_official_weights, to_fla, write_model_dir
from packaging.version import Version
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
    result = run_python(code, env=env, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def expected_logits(official):
    config, state = to_fla(official)
    model = RWKV7ForCausalLM(RWKV7Config(**config))
    model.load_state_dict(state)
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits


@pytest.mark.slow
def test_local_folder_imports_its_own_kernels(tmp_path):
    official = random_official_weights(hidden=128, layers=2, seed=11)
    folder = write_model_dir(tmp_path / "local_model", official)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    modeling = sys.modules[type(model).__module__]
    assert type(model).__module__.startswith("transformers_modules.")
    assert Path(modeling.kernels.__file__).parent == folder / "rwkv7_kernels"
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor(TOKENS)).logits, expected_logits(official))


@pytest.mark.slow
def test_hub_repo_id_from_offline_cache_uses_kernels_of_the_same_commit(tmp_path):
    official = random_official_weights(hidden=128, layers=2, seed=12)
    old = write_model_dir(tmp_path / "old", official, pack_x_x=True)  # an older upload, in the packed layout
    new = write_model_dir(tmp_path / "new", official)
    # the newer commit's kernels differ: loading the old commit must not pick them up
    with open(new / "rwkv7_kernels" / "__init__.py", "a") as f:
        f.write("\nraise ImportError('kernels of the newer commit were imported')\n")
    cache = tmp_path / "hub"
    old_commit = add_repo_to_cache(cache, "rwkv-test/tiny", old)
    new_commit = add_repo_to_cache(cache, "rwkv-test/tiny", new)  # refs/main -> new
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}

    result = run_probe("rwkv-test/tiny", env, revision=old_commit)
    assert f"snapshots/{old_commit}/rwkv7_kernels/__init__.py" in result["kernels"]
    torch.testing.assert_close(torch.tensor(result["logits"]), expected_logits(official))

    failed = run_python(PROBE.format(source="rwkv-test/tiny", kwargs={}, tokens=TOKENS, block_triton=False), env=env,
                        cwd="/")
    assert failed.returncode != 0 and "kernels of the newer commit were imported" in failed.stderr
    assert new_commit != old_commit


@pytest.mark.slow
def test_source_checkout_import_and_no_triton_needed(tmp_path):
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, modeling_rwkv7\n"
        "from configuration_rwkv7 import RWKV7Config\n"
        "m = modeling_rwkv7.RWKV7ForCausalLM(RWKV7Config(vocab_size=50, hidden_size=64, num_hidden_layers=1, "
        "head_dim=32, decay_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8, gate_low_rank_dim=8))\n"
        "print(m(torch.tensor([[1, 2, 3]])).logits.shape, modeling_rwkv7.kernels.__file__, modeling_rwkv7.kernels.HAS_TRITON)\n"
    )
    result = run_python(code, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"torch.Size([1, 3, 50]) {REPO / 'rwkv7_kernels' / '__init__.py'} False" in result.stdout

    official = random_official_weights(hidden=128, layers=1, seed=13)
    folder = write_model_dir(tmp_path / "no_triton", official)
    result = run_probe(folder, {"HF_MODULES_CACHE": str(tmp_path / "modules")}, block_triton=True)
    assert result["has_triton"] is False
    torch.testing.assert_close(torch.tensor(result["logits"]), expected_logits(official))


def test_remote_code_import_scanner_requires_none_of_the_package_modules():
    """transformers scans remote code for the packages it imports and refuses to load it when one is missing.
    transformers 4.48's scanner skips only `try:` .. `except ...:` and so counted an import in the except branch
    (the source-checkout fallback) as a required package: loading failed from any folder but this checkout."""
    from transformers.dynamic_module_utils import get_imports

    own = {"configuration_rwkv7", "modeling_rwkv7", "tokenization_rwkv7", "rwkv7_kernels"}
    for name in ("configuration_rwkv7.py", "modeling_rwkv7.py", "tokenization_rwkv7.py"):
        assert not own & set(get_imports(REPO / name)), name


FLA_PROBE = """
import json, torch
import fla  # registers fla's own RWKV-7 classes for model type rwkv7 in this process
from transformers import AutoModelForCausalLM
from transformers.dynamic_module_utils import get_class_from_dynamic_module

auto = AutoModelForCausalLM.from_pretrained({folder!r}, trust_remote_code=True)
# the README's way to this package's classes when fla is imported
RWKV7ForCausalLM = get_class_from_dynamic_module("modeling_rwkv7.RWKV7ForCausalLM", {folder!r})
model = RWKV7ForCausalLM.from_pretrained({folder!r})
with torch.no_grad():
    logits = model(torch.tensor({tokens!r})).logits
print(json.dumps({{"auto": type(auto).__module__, "ours": type(model).__module__, "config": type(model.config).__module__,
                  "logits": logits.tolist()}}))
"""


@pytest.mark.slow
@pytest.mark.skipif(Version(transformers.__version__) < Version("5.6.2"), reason="fla 0.6 needs transformers >= 5.6.2")
def test_with_fla_imported_the_readme_way_loads_this_package(tmp_path):
    """`import fla` registers fla's RWKV-7 classes in the process, and transformers then prefers them to a repo's
    remote code; the README shows how to get this package's classes all the same."""
    official = random_official_weights(hidden=128, layers=2, seed=17)
    folder = write_model_dir(tmp_path / "model", official)
    result = run_python(FLA_PROBE.format(folder=str(folder), tokens=TOKENS), cwd="/",
                        env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["auto"].startswith("fla.")  # what users get from AutoModelForCausalLM beside fla
    assert probe["ours"].startswith("transformers_modules.") and probe["config"].startswith("transformers_modules.")
    torch.testing.assert_close(torch.tensor(probe["logits"]), expected_logits(official))
