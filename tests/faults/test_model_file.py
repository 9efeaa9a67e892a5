"""A runs/{run}/model.pt that `amorlip export` did not write: one line naming the file and the fix.

Before, a text file gave ``KeyError: 101`` from deep inside torch's legacy unpickler, a one-byte file
``IndexError: pop from empty list``, and a foreign pickle torch's advice to retry with
``weights_only=False`` (which would run it).
"""

from __future__ import annotations

import pickle

import pytest
import torch

from amorlip.cli import main as cli_main
from amorlip.model_file import FORMAT, ModelFileError, load_exported


def _real_model_file(path) -> None:
    from amorlip.models import create_model, model_config

    model, _, _ = create_model("amorlip-tiny")
    torch.save({"format": FORMAT, "model_name": "amorlip-tiny", "model_config": model_config("amorlip-tiny"),
                "model_kwargs": {}, "state_dict": model.state_dict(), "run": {"method": "clip"},
                "lambda_nets": None, "step": 1}, path)


BAD_FILES = {
    "text": (lambda p: p.write_text("hello, not weights\n"), "not a torch zip archive"),
    "one_byte": (lambda p: p.write_bytes(b"e"), "not a torch zip archive"),
    "plain_pickle": (lambda p: p.write_bytes(pickle.dumps({"state_dict": {}})), "not a torch zip archive"),
    "truncated": (lambda p: (_real_model_file(p), p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
                  "not a torch zip archive"),
    "other_torch_file": (lambda p: torch.save([1, 2, 3], p), "format 'list'"),
    "other_format": (lambda p: torch.save({"format": "open_clip", "state_dict": {}}, p), "format 'open_clip'"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_foreign_model_file_is_named_with_the_fix(tmp_path, case):
    make, expected = BAD_FILES[case]
    path = tmp_path / "model.pt"
    make(path)
    with pytest.raises(ModelFileError) as info:
        load_exported(path)
    message = str(info.value)
    assert str(path) in message and expected in message and "rerun the export" in message, message
    assert "\n" not in message


def test_a_real_model_file_still_loads(tmp_path):
    _real_model_file(tmp_path / "model.pt")
    model, _, _, meta = load_exported(tmp_path / "model.pt")
    assert meta["step"] == 1 and sum(p.numel() for p in model.parameters()) > 0


def test_amorlip_evaluate_says_it_in_one_line(tmp_path, capsys):
    (tmp_path / "runs" / "clip").mkdir(parents=True)
    (tmp_path / "runs" / "clip" / "model.pt").write_text("not a model\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"paths: {{runs: '{tmp_path / 'runs'}', results: '{tmp_path / 'results'}'}}\n"
                      "runs:\n  clip: {method: clip, model: amorlip-tiny}\n")
    rc = cli_main(["evaluate", "--config", str(config), "--run", "clip", "--suite", "emoji-heldout",
                   "--out", str(tmp_path / "results" / "clip" / "emoji-heldout.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("amorlip: ") and "model.pt is not a model file" in err, err
    assert "Traceback" not in err and "KeyError" not in err
