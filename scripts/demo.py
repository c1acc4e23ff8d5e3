"""Builds a small random RWKV-7 model as a Hub-style folder and chats with it the way users do.

    bash dev.sh demo [--layers 4] [--hidden 256] [--device cpu|cuda]

The folder holds what a model repo on the Hub holds (config, weights, this package's code, the tokenizer), and
is loaded with AutoModelForCausalLM / AutoTokenizer and trust_remote_code=True. The weights are random, so the
reply is gibberish; what the demo shows is the whole path working: chat template, prefill, streamed decoding,
stopping at the end of a turn, and reusing the state for a second question.
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, TextStreamer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from configuration_rwkv7 import RWKV7Config  # noqa: E402
from modeling_rwkv7 import RWKV7ForCausalLM  # noqa: E402


def build_model_folder(folder: Path, hidden: int, layers: int):
    torch.manual_seed(0)
    config = RWKV7Config(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=4 * hidden, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0)
    RWKV7ForCausalLM(config).save_pretrained(folder)  # writes the code and kernels/ too
    AutoTokenizer.from_pretrained(REPO, trust_remote_code=True).save_pretrained(folder)
    GenerationConfig.from_pretrained(REPO).save_pretrained(folder)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--folder", type=Path, default=REPO / ".cache" / "demo-model")
    args = parser.parse_args()

    build_model_folder(args.folder, args.hidden, args.layers)
    model = AutoModelForCausalLM.from_pretrained(args.folder, trust_remote_code=True).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.folder, trust_remote_code=True)
    print(f"model: {args.layers} layers x {args.hidden} wide, random weights, on {args.device}; folder {args.folder}")

    system = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."}]
    prefix = tokenizer.apply_chat_template(system, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        system_state = model(**prefix.to(args.device), use_cache=True).past_key_values  # prefilled once

    for question in ["What is RWKV?", "Name a prime number."]:
        full = tokenizer.apply_chat_template(system + [{"role": "user", "content": question}],
                                             add_generation_prompt=True, tokenize=False)
        text = full[len(tokenizer.decode(prefix["input_ids"][0])):]  # only what follows the prefilled system turn
        inputs = tokenizer(text, return_tensors="pt").to(args.device)
        print(f"\nUser: {question}\nAssistant:", end="", flush=True)
        start = time.perf_counter()
        output = model.generate(**inputs, past_key_values=copy.deepcopy(system_state), max_new_tokens=32,
                                do_sample=True, temperature=1.0, top_p=0.3,
                                streamer=TextStreamer(tokenizer, skip_prompt=True))
        new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
        print(f"[{new_tokens} tokens in {time.perf_counter() - start:.2f} s]")


if __name__ == "__main__":
    main()
