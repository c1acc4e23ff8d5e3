"""`bash dev.sh demo`: it chats through the Hub path, says plainly when its replies are noise, and takes --model."""

import shutil
import sys

from official import REPO, random_official_weights, write_model_dir

sys.path.insert(0, str(REPO / "scripts"))
import demo  # noqa: E402


def test_random_model_says_its_replies_are_noise(tmp_path, capsys):
    demo.main(["--hidden", "64", "--layers", "1", "--max-new-tokens", "3", "--folder", str(tmp_path / "demo"),
               "--device", "cpu"])
    out = capsys.readouterr().out
    assert "weights of this model are random, so its replies below are noise" in out
    assert "--model fla-hub/rwkv7-0.1B-g1" in out
    assert out.count("Assistant:") == len(demo.QUESTIONS) and out.count(" tokens in ") == len(demo.QUESTIONS)


def test_model_argument_chats_with_that_model(tmp_path, capsys):
    folder = write_model_dir(tmp_path / "model", random_official_weights(hidden=64, layers=1, head_dim=32,
                                                                         vocab=65536, ranks=(8, 8, 8, 8), seed=3))
    for name in ("tokenization_rwkv7.py", "rwkv_vocab_v20230424.txt", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json"):
        shutil.copyfile(REPO / name, folder / name)
    demo.main(["--model", str(folder), "--max-new-tokens", "3", "--device", "cpu"])
    out = capsys.readouterr().out
    assert f"model: {folder} (1 layers x 64 wide" in out and "noise" not in out
    assert out.count("Assistant:") == len(demo.QUESTIONS)
