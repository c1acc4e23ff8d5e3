"""Chats with an RWKV-7 model the way users do: AutoModelForCausalLM / AutoTokenizer with trust_remote_code=True,
the chat template, a prefilled system prompt whose state is reused for each question, streamed generation that
stops at the end of a turn.

    bash dev.sh demo                                   # the small English model in models/, offline
    bash dev.sh demo --model fla-hub/rwkv7-0.1B-g1     # any Hub model id or local model folder

By default the demo chats with models/rwkv7-tiny-english, a 19M-parameter model trained for four minutes on Jane
Austen, the Python documentation and WordNet definitions (scripts/train_small_model.py, docs/tiny_model.md): it
answers in simple English, best at "What does X mean?". Its folder holds weights and configuration only; the demo
lays it out as a Hub repo is (with this checkout's code and tokenizer) and loads it as one.
"""

import argparse
import copy
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hub_tools.files import CODE_FILES, GENERATION_CONFIG_FILE, TOKENIZER_FILES, copy_files  # noqa: E402

TINY_MODEL = REPO / "models" / "rwkv7-tiny-english"
SYSTEM = "You answer questions about words and Python."
QUESTIONS = ['What does "garden" mean?', 'What does "river" mean?']


def hub_style_folder(weights_folder: Path, folder: Path):
    """`folder` holding the model of `weights_folder` as a Hub repo holds it: its config and weights, this
    checkout's code, tokenizer and generation config."""
    if folder.exists():
        shutil.rmtree(folder)
    copy_files(weights_folder, folder, ["config.json", "model.safetensors"])
    copy_files(REPO, folder, [*CODE_FILES, *TOKENIZER_FILES, GENERATION_CONFIG_FILE])
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Hub model id or a local model folder (default: models/rwkv7-tiny-english)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest reply, in tokens (default 64)")
    parser.add_argument("--folder", type=Path, default=REPO / ".cache" / "demo-model",
                        help="where the default model is laid out as a Hub repo (default .cache/demo-model)")
    args = parser.parse_args(argv)

    source = args.model or str(hub_style_folder(TINY_MODEL, args.folder))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True, dtype=dtype).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    print(f"model: {source} ({layers} layers x {hidden} wide, {str(dtype).removeprefix('torch.')}, on {args.device})")

    system = [{"role": "system", "content": SYSTEM}]
    prefix = tokenizer.apply_chat_template(system, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        system_state = model(**prefix.to(args.device), use_cache=True).cache  # prefilled once

    for question in QUESTIONS:
        full = tokenizer.apply_chat_template(system + [{"role": "user", "content": question}],
                                             add_generation_prompt=True, tokenize=False)
        text = full[len(tokenizer.decode(prefix["input_ids"][0])):]  # only what follows the prefilled system turn
        inputs = tokenizer(text, return_tensors="pt").to(args.device)
        print(f"\nUser: {question}\nAssistant:", end="", flush=True)
        start = time.perf_counter()
        torch.manual_seed(0)
        output = model.generate(**inputs, cache=copy.deepcopy(system_state), max_new_tokens=args.max_new_tokens,
                                do_sample=True, temperature=1.0, top_p=0.3,
                                streamer=TextStreamer(tokenizer, skip_prompt=True))
        new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
        print(f"[{new_tokens} tokens in {time.perf_counter() - start:.2f} s]")


if __name__ == "__main__":
    main()
