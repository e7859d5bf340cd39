"""milora-train / milora-eval CLIs on a tiny model directory: bad input exits 2 with a useful
message (a malformed JSONL line names its line), a trained adapter loads, evaluates and exports."""

from __future__ import annotations

import json

import pytest

from helpers import tiny_llama
from milora.errors import DataError
from milora.train import cli, eval_cli
from milora.train.data import read_jsonl
from train_helpers import char_tokenizer


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-base")
    tiny_llama(0).save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def good_records(n=12):
    return [{"prompt": f"colour {i}?", "response": ["red", "blue"][i % 2]} for i in range(n)]


def test_malformed_line_reports_its_line_number(tmp_path, base_dir, capsys):
    data = write_lines(tmp_path / "d.jsonl", good_records(2) + ['{"prompt": "x", "response": '] + good_records(1))
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        read_jsonl(data)
    code = cli.main(["--base", str(base_dir), "--data", str(data), "--out", str(tmp_path / "a"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "d.jsonl:3" in err and "Traceback" not in err


def test_missing_field_and_bad_messages_are_named(tmp_path):
    with pytest.raises(DataError, match=r":2: missing field\(s\) \['response'\]"):
        read_jsonl(write_lines(tmp_path / "a.jsonl", good_records(1) + [{"prompt": "only"}]))
    with pytest.raises(DataError, match=r":1: 'messages' must be"):
        read_jsonl(write_lines(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]))
    chat = read_jsonl(write_lines(tmp_path / "c.jsonl", [{"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]))
    assert (chat[0].prompt, chat[0].response) == ("q", "a")


def test_bad_options_exit_2(tmp_path, base_dir, capsys):
    data = write_lines(tmp_path / "d.jsonl", good_records())
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"train": {"learning_rate": 1}}))
    argv = ["--base", str(base_dir), "--data", str(data), "--out", str(tmp_path / "a"), "--no-progress"]
    assert cli.main(argv + ["--config", str(conf)]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert cli.main(argv + ["--top-k", "9"]) == 2
    assert "top_k" in capsys.readouterr().err
    assert cli.main(["--base", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "a")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert cli.main(argv + ["--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_train_then_eval_then_export(tmp_path, base_dir, capsys):
    data = write_lines(tmp_path / "d.jsonl", good_records(16))
    dev = write_lines(tmp_path / "dev.jsonl", good_records(4))
    out = tmp_path / "adapter"
    argv = ["--base", str(base_dir), "--data", str(data), "--dev-data", str(dev), "--out", str(out), "--rank", "4", "--alpha", "8",
            "--top-k", "2", "--max-steps", "3", "--batch-size", "4", "--eval-every", "1", "--lr", "1e-2",
            "--no-progress"]
    assert cli.main(argv) == 0
    saved = json.loads((out / "milora_config.json").read_text())
    assert saved["top_k"] == 2 and saved["rank"] == 4 and saved["routed"] is True
    log = json.loads((out / "train_log.json").read_text())
    assert log["result"]["steps"] == 3 and len(log["result"]["history"]) == 3

    mc = write_lines(tmp_path / "mc.jsonl", [{"prompt": f"colour {i}?", "response": "red", "choices": ["red", "blue"],
                                              "answer_index": i % 2} for i in range(6)])
    res = tmp_path / "res.json"
    code = eval_cli.main(["--base", str(base_dir), "--adapter", str(out), "--data", str(mc), "--json", str(res),
                          "--routing-stats", str(tmp_path / "routing"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    result = json.loads(res.read_text())
    assert result["n"] == 6 and len(result["correct"]) == 6
    assert result["ci95"][0] <= result["accuracy"] <= result["ci95"][1]
    freq = json.loads((tmp_path / "routing.json").read_text())["frequency"]
    assert all(abs(sum(row) - 2.0) < 1e-6 for row in freq)
    assert (tmp_path / "routing.png").stat().st_size > 0

    pytest.importorskip("onnxruntime")
    from milora.export.exporter import export

    manifest = export(base_dir, tmp_path / "exported", adapters={"trained": out}, progress=False)
    assert "trained" in json.dumps(manifest)


def test_lora_flag_trains_a_router_free_adapter(tmp_path, base_dir):
    data = write_lines(tmp_path / "d.jsonl", good_records(8))
    out = tmp_path / "lora"
    assert cli.main(["--base", str(base_dir), "--data", str(data), "--out", str(out), "--lora", "--rank", "2",
                     "--max-steps", "1", "--batch-size", "4", "--no-progress"]) == 0
    saved = json.loads((out / "milora_config.json").read_text())
    assert saved["routed"] is False and saved["top_k"] == 7
    from safetensors import safe_open

    with safe_open(str(out / "milora_adapter.safetensors"), "np") as f:
        assert not any(".router." in k for k in f.keys())


def test_jsonl_dev_holdout_is_disjoint_and_complete(tmp_path):
    from milora.train.api import dataset

    data = write_lines(tmp_path / "d.jsonl", good_records(60))
    train, dev = dataset(data=data, split="train"), dataset(data=data, split="dev")
    keys = lambda xs: {e.key for e in xs}  # noqa: E731
    assert keys(train).isdisjoint(keys(dev)) and len(train) + len(dev) == 60
    assert 0 < len(dev) < 20
    assert len(dataset(data=data, split="train", dev_percent=0)) == 60
