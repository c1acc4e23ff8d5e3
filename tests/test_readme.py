"""The README's Python snippets run as written, in order, against a small model laid out offline under the Hub id
they name (the model is random; the snippets' code paths are what is tested)."""

import json
import re
import shutil

import pytest
from helpers import run_python
from hub_cache import add_repo_to_cache
from official import REPO, random_official_weights, write_model_dir

HUB_ID = "fla-hub/rwkv7-1.5B-g1"
TOKENIZER_FILES = ("tokenization_rwkv7.py", "rwkv_vocab_v20230424.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")


def readme_snippets():
    return re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.DOTALL | re.MULTILINE)


@pytest.mark.slow
def test_readme_python_snippets_run_as_written(tmp_path):
    snippets = readme_snippets()
    assert len(snippets) >= 6 and HUB_ID in snippets[0] and 'device_map="auto"' in snippets[-1]
    folder = write_model_dir(tmp_path / "model", random_official_weights(hidden=64, layers=1, head_dim=32,
                                                                         vocab=65536, ranks=(8, 8, 8, 8), seed=5))
    for name in TOKENIZER_FILES:
        shutil.copyfile(REPO / name, folder / name)
    add_repo_to_cache(tmp_path / "hub", HUB_ID, folder)

    code = "\n".join(snippets) + (
        "\nimport json\n"
        "print(json.dumps({'model': type(model).__module__, 'reply': reply, 'seen': state.num_seen_tokens,"
        " 'more': list(more.shape), 'next': list(next_ids.shape), 'steps': trainer.state.global_step}))\n"
    )
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = run_python(code, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["model"].startswith("transformers_modules.") and isinstance(facts["reply"], str)
    assert facts["seen"] >= facts["next"][1] and facts["more"][1] > facts["next"][1]
    assert facts["steps"] == 1
