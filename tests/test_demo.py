"""`bash dev.sh demo`: by default it chats with the small trained model through the Hub path, in English; --model
takes any model folder (or Hub id)."""

import shutil
import sys

from official import REPO, random_official_weights, write_model_dir

sys.path.insert(0, str(REPO / "scripts"))
import demo  # noqa: E402


def test_default_model_answers_in_english(tmp_path, capsys):
    demo.main(["--max-new-tokens", "24", "--folder", str(tmp_path / "demo"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert f"model: {tmp_path / 'demo'} (12 layers x 128 wide" in out
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == sorted(
        ["config.json", "model.safetensors", "configuration_rwkv7.py", "modeling_rwkv7.py", "rwkv7_kernels",
         "tokenization_rwkv7.py", "rwkv_vocab_v20230424.txt", "tokenizer_config.json", "special_tokens_map.json",
         "generation_config.json"]
    )
    replies = [part.split("[")[0] for part in out.split("Assistant:")[1:]]
    assert len(replies) == len(demo.QUESTIONS)
    for reply in replies:  # English words, not noise
        assert sum(word.strip('.,:"').isalpha() for word in reply.split()) >= 8, reply


def test_model_argument_chats_with_that_model(tmp_path, capsys):
    folder = write_model_dir(tmp_path / "model", random_official_weights(hidden=64, layers=1, head_dim=32,
                                                                         vocab=65536, ranks=(8, 8, 8, 8), seed=3))
    for name in ("tokenization_rwkv7.py", "rwkv_vocab_v20230424.txt", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json"):
        shutil.copyfile(REPO / name, folder / name)
    demo.main(["--model", str(folder), "--max-new-tokens", "3", "--device", "cpu"])
    out = capsys.readouterr().out
    assert f"model: {folder} (1 layers x 64 wide" in out
    assert out.count("Assistant:") == len(demo.QUESTIONS)
