"""Maintainers' tool: convert official RWKV-7 checkpoints to the fla-hub layout and keep Hub repos' code current.

    python upload_to_hub.py convert MODEL.pth OUT_DIR [--dtype bfloat16|float16|float32]
    python upload_to_hub.py push OUT_DIR --repo ORG/NAME [--revision BRANCH] [--pr] [--private] [--dry-run]
    python upload_to_hub.py update-code --repo ORG/NAME [--repo ...] [--revision BRANCH] [--pr] [--dry-run]

`convert` needs BlinkDL's `rwkv` package (`pip install rwkv`): every conversion is checked against it. `push` and
`update-code` authenticate the way huggingface_hub is configured (HF_TOKEN or `hf auth login`).

The work is done in hub_tools/: convert.py (convert), publish.py (push, update-code), files.py (the package's
files, the one list).
"""

import argparse
import sys

import torch

from hub_tools.convert import DEFAULT_MAX_SHARD_SIZE, UnsupportedCheckpoint, VerificationError, convert
from hub_tools.publish import push, update_code

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


CONVERT_HELP = """\
Converts an official RWKV-7 checkpoint (BlinkDL's x070 .pth) into a folder that can be pushed to the Hub as it
is: config.json, generation_config.json, safetensors weights in fla-hub's key names, this package's code and,
for World-vocabulary models, the World tokenizer.

Before the folder is created, the converted model is loaded with transformers (trust_remote_code=True) and its
logits are compared with those of BlinkDL's `rwkv` package on the same weights (pip install rwkv); a conversion
that disagrees leaves nothing behind. Checkpoint variants this package does not implement (DeepEmbed, ...) are
refused by name.

example:
  python upload_to_hub.py convert rwkv7-g1-0.4b-20250324-ctx4096.pth rwkv7-0.4B-g1 --dtype bfloat16
"""

PUSH_HELP = """\
Uploads a folder made by `convert` to a Hub model repo, in one commit (or one pull request with --pr). Only the
files of a model folder are uploaded: config.json, the weights, generation_config.json, this package's code and
tokenizer files, and README.md if there is one; anything else in the folder (notes, caches, tokens) stays local.
Weight files of an earlier upload that the new weights do not use are deleted from the repo.

Authenticates as huggingface_hub is configured (HF_TOKEN, or `hf auth login`). Without --pr the repo and the
branch are created when missing.

examples:
  python upload_to_hub.py push rwkv7-0.4B-g1 --repo my-org/rwkv7-0.4B-g1 --dry-run
  python upload_to_hub.py push rwkv7-0.4B-g1 --repo my-org/rwkv7-0.4B-g1
"""

UPDATE_CODE_HELP = """\
Commits this checkout's code to existing RWKV-7 model repos, leaving their weights untouched; a repo that is up to
date gets no commit. Per repo, in one commit (or one pull request with --pr):
  - the model code (configuration_rwkv7.py, modeling_rwkv7.py, rwkv7_kernels/) is replaced by this checkout's,
    and config.json gets this package's auto_map; every other config key stays;
  - repos with the World vocabulary (rwkv_vocab_v20230424.txt) get this package's tokenizer files and
    generation_config.json, which stops `generate` at the end of a chat turn;
  - code the package no longer has is deleted (older kernel files, an older tokenizer's code).

Authenticates as huggingface_hub is configured (HF_TOKEN, or `hf auth login`). Run with --dry-run first: it lists
every file it would add, change or delete.

examples:
  python upload_to_hub.py update-code --repo fla-hub/rwkv7-0.4B-world --repo fla-hub/rwkv7-1.5B-g1 --dry-run
  python upload_to_hub.py update-code --repo fla-hub/rwkv7-0.4B-world --pr
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\nThe key mapping")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, description):
        return commands.add_parser(
            name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
        )

    p = command("convert", "official .pth -> a verified model folder, ready to push", CONVERT_HELP)
    p.add_argument("pth", help="the official RWKV-7 checkpoint (x070), e.g. rwkv7-g1-0.4b-20250324-ctx4096.pth")
    p.add_argument("out_dir", help="the folder to create; it must not exist, or be empty")
    p.add_argument(
        "--dtype", choices=DTYPES, help="precision of the stored weights (default: the checkpoint's own)"
    )
    p.add_argument(
        "--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest weight file, e.g. 500MB or 2GB (default {DEFAULT_MAX_SHARD_SIZE}); larger models are sharded",
    )
    p.add_argument(
        "--tokenizer", choices=("world", "none"), default="world",
        help="world: ship the RWKV World tokenizer (default, for 65536-row vocabularies); none: ship no tokenizer "
        "(Pile models: add theirs by hand)",
    )

    p = command("push", "upload a converted folder to a Hub repo, in one commit", PUSH_HELP)
    p.add_argument("out_dir", help="a folder made by `convert`")
    add_commit_arguments(p)
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its setting)")

    p = command("update-code", "bring existing Hub repos to this checkout's code, weights untouched", UPDATE_CODE_HELP)
    add_commit_arguments(p, several=True)
    return parser


def add_commit_arguments(parser, several=False):
    parser.add_argument(
        "--repo", required=True, action="append" if several else "store", metavar="ORG/NAME",
        help="the Hub model repo" + (" (repeat --repo for several repos)" if several else ""),
    )
    parser.add_argument("--revision", metavar="BRANCH", help="branch to commit to (default: the repo's default branch)")
    parser.add_argument("--pr", action="store_true", help="open a pull request instead of committing to the branch")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the files it would add, change and delete; upload nothing"
    )


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "convert":
            convert(args.pth, args.out_dir, DTYPES.get(args.dtype), args.max_shard_size, args.tokenizer)
        elif args.command == "push":
            push(args.out_dir, args.repo, args.revision, args.pr, args.private, args.dry_run)
        else:
            update_code(args.repo, args.revision, args.pr, args.dry_run)
    except (UnsupportedCheckpoint, VerificationError, FileExistsError, FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
