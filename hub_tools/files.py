"""The files of this package, and the layout of a Hub model folder: the one list of what the package ships.

Used by `upload_to_hub.py` (convert copies these files into a model folder, push uploads them, update-code brings
Hub repos to them) and by the tests, which copy them next to the models they build.
"""

import json
import shutil
from pathlib import Path

from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent

# The package's files, by name: the only files `push` and `update-code` ever upload (besides config.json, the
# weights and an optional model card), and the files tests copy next to a model. rwkv7_kernels/ is the package's own
# folder, so every .py file in it belongs to the package.
MODEL_CODE_FILES = (
    "configuration_rwkv7.py",
    "modeling_rwkv7.py",
    *sorted(f"rwkv7_kernels/{path.name}" for path in (REPO / "rwkv7_kernels").glob("*.py")),
)
TOKENIZER_CODE_FILES = ("tokenization_rwkv7.py",)
CODE_FILES = MODEL_CODE_FILES + TOKENIZER_CODE_FILES
WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"
TOKENIZER_FILES = (WORLD_VOCAB_FILE, "tokenizer_config.json", "special_tokens_map.json")
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CARD_FILE = "README.md"
SINGLE_WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# Weight files a repo may hold from an earlier upload; `push` deletes those its new weights do not list.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pth")
# Tokenizer code that earlier uploads of World models shipped and tokenization_rwkv7.py replaces.
LEGACY_TOKENIZER_CODE_FILES = ("hf_rwkv_tokenizer.py",)
# The package's kernel folder, and its name in earlier uploads (renamed: a kernels/ folder on sys.path shadows the
# `kernels` package that transformers 5.25 imports); update-code deletes files there that the checkout lacks.
KERNEL_FOLDERS = ("rwkv7_kernels/", "kernels/")

AUTO_MAP = {
    "AutoConfig": "configuration_rwkv7.RWKV7Config",
    "AutoModel": "modeling_rwkv7.RWKV7Model",
    "AutoModelForCausalLM": "modeling_rwkv7.RWKV7ForCausalLM",
}
# Id 0 ends a document in both RWKV vocabularies (World: not in the vocab file, the tokenizer's <|endoftext|>;
# Pile: GPT-NeoX's <|endoftext|>). It is bos, eos and pad, as in tokenizer_config.json and generation_config.json.
END_OF_DOCUMENT_ID = 0
WORLD_VOCAB_IDS = 65530  # ids 0..65529; World models have 65536 embedding rows


def weight_files(folder) -> dict:
    """{tensor name: file} of the safetensors weights in `folder` (sharded with an index, or one file)."""
    folder = Path(folder)
    if (folder / WEIGHTS_INDEX_FILE).is_file():
        return json.loads((folder / WEIGHTS_INDEX_FILE).read_text())["weight_map"]
    if (folder / SINGLE_WEIGHTS_FILE).is_file():
        with safe_open(folder / SINGLE_WEIGHTS_FILE, framework="pt") as f:
            return {name: SINGLE_WEIGHTS_FILE for name in f.keys()}
    raise FileNotFoundError(f"{folder} has no {SINGLE_WEIGHTS_FILE} and no {WEIGHTS_INDEX_FILE}")


def copy_files(source, destination, names):
    """Copies `names` (paths relative to `source`) into `destination`, creating sub-folders."""
    for name in names:
        target = Path(destination) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(source) / name, target)


def first_few(items, n=6):
    """The first n items, comma-separated, and how many more there are: for messages."""
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
