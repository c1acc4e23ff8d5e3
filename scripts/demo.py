"""Chats with an RWKV-7 model the way users do: AutoModelForCausalLM / AutoTokenizer with trust_remote_code=True,
the chat template, a prefilled system prompt whose state is reused for each question, streamed generation that
stops at the end of a turn.

    bash dev.sh demo                                   # a small model with random weights, built here: no download
    bash dev.sh demo --model fla-hub/rwkv7-0.1B-g1     # a real model from the Hub (or a local model folder)

Without --model the demo builds a small model with random weights as a Hub-style folder (config, weights, this
package's code, the tokenizer): it shows the whole path working, but its replies are noise.
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

QUESTIONS = ["What is RWKV?", "Name a prime number."]


def build_random_model_folder(folder: Path, hidden: int, layers: int):
    torch.manual_seed(0)
    config = RWKV7Config(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=4 * hidden, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0)
    RWKV7ForCausalLM(config).save_pretrained(folder)  # writes the code and rwkv7_kernels/ too
    AutoTokenizer.from_pretrained(REPO, trust_remote_code=True).save_pretrained(folder)
    GenerationConfig.from_pretrained(REPO).save_pretrained(folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Hub model id or a local model folder (default: a small random model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest reply, in tokens (default 64)")
    parser.add_argument("--hidden", type=int, default=256, help="width of the random model (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random model (default 4)")
    parser.add_argument("--folder", type=Path, default=REPO / ".cache" / "demo-model",
                        help="where the random model is written (default .cache/demo-model)")
    args = parser.parse_args(argv)

    source = args.model
    if source is None:
        build_random_model_folder(args.folder, args.hidden, args.layers)
        source = str(args.folder)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True, dtype=dtype).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    print(f"model: {source} ({layers} layers x {hidden} wide, {str(dtype).removeprefix('torch.')}, on {args.device})")
    if args.model is None:
        print("The weights of this model are random, so its replies below are noise: the demo shows the chat path "
              "working (template, prefill, streaming, stopping, state reuse). For real replies, pass a trained "
              "model: bash dev.sh demo --model fla-hub/rwkv7-0.1B-g1")

    system = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."}]
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
        output = model.generate(**inputs, cache=copy.deepcopy(system_state), max_new_tokens=args.max_new_tokens,
                                do_sample=True, temperature=1.0, top_p=0.3,
                                streamer=TextStreamer(tokenizer, skip_prompt=True))
        new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
        print(f"[{new_tokens} tokens in {time.perf_counter() - start:.2f} s]")


if __name__ == "__main__":
    main()
