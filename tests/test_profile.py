"""`dsc profile`: per-layer expert loads equal the routing transformers computes on the same prompts."""

import json

import numpy as np
import torch
from dsc.cli import main
from hf_reference import load_hf_model, save_hf_checkpoint


def test_profile_counts_match_transformers_routing(tmp_path, capsys):
    ckpt = save_hf_checkpoint("v3_yarn_grouped", tmp_path / "ckpt")
    prompts = [[1, 5, 9, 17, 33, 65, 127, 3], [100, 3, 3, 42, 7]]
    (tmp_path / "prompts.txt").write_text("\n".join(",".join(map(str, p)) for p in prompts) + "\n")
    code = main(["profile", str(ckpt), "--prompts", str(tmp_path / "prompts.txt"), "-o", str(tmp_path / "load.json")])
    assert code == 0
    result = json.loads((tmp_path / "load.json").read_text())
    assert result["layers"] == [1, 2] and result["experts"] == 8 and result["tokens"] == 13

    model = load_hf_model(ckpt)
    seen: dict[int, np.ndarray] = {}
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):

            def hook(_module, _inputs, output, i=i):
                seen[i] = seen.get(i, np.zeros(8, dtype=np.int64)) + np.bincount(output[2].reshape(-1), minlength=8)

            layer.mlp.gate.register_forward_hook(hook)
    with torch.no_grad():
        for p in prompts:
            model(torch.tensor([p]))
    assert result["load"] == [seen[1].tolist(), seen[2].tolist()]
    assert all(sum(row) == 13 * 2 for row in result["load"])  # every token picks top_k = 2 experts
    assert "hottest expert / mean per layer" in capsys.readouterr().out


def test_profile_rejects_bad_prompt_files(tmp_path, capsys):
    from dsc.frontends.presets import make_model

    ckpt = make_model("tiny", tmp_path / "tiny")
    (tmp_path / "p.txt").write_text("not ids\n")
    assert main(["profile", str(ckpt), "--prompts", str(tmp_path / "p.txt"), "-o", str(tmp_path / "o.json")]) == 2
    assert "tokenizer.json" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("1,2,99999\n")
    assert main(["profile", str(ckpt), "--prompts", str(tmp_path / "p.txt"), "-o", str(tmp_path / "o.json")]) == 2
    assert "vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()
