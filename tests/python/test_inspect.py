"""`finequant inspect` on tiny random models: the ranges it collects and the PNG it writes."""
import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from finequant.cli import main  # noqa: E402
from finequant.inspection import collect_ranges, inspect_model, spread  # noqa: E402
from finequant.lkd import load_torch_model  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_inspect_writes_a_png(family, tiny_models, tmp_path):
    out = tmp_path / "ranges.png"
    summary = inspect_model(str(tiny_models[family]), str(out), samples=2, seq=16)
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000
    assert list(summary) == ["qkv", "attn_out", "fc1", "fc2"]
    assert all(1 <= s["token_spread"] <= s["token_spread_max"] and 1 <= s["row_spread"] <= s["row_spread_max"]
               for s in summary.values())


def test_ranges_are_per_token_and_per_row(tiny_models):
    model = load_torch_model(str(tiny_models["llama"]), "llama")
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    ranges = collect_ranges(model, "llama", 2, ids, batch=2)
    acts, rows = ranges["qkv"][1]
    assert acts.shape == (30,)  # one value per token
    attn = model.model.layers[1].self_attn
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    np.testing.assert_array_equal(rows, w.abs().amax(1).numpy())  # q, k and v rows pooled
    assert ranges["fc1"][0][1].shape == (2 * 96,)  # gate and up
    assert spread(np.array([1.0, 2.0, 8.0])) == 4.0


def test_cli_inspect(tiny_models, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["inspect", str(tiny_models["gpt2"]), "-o", str(out), "--samples", "2", "--seq", "8"]) == 0
    assert out.read_bytes()[:8] == PNG
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "fc2" in printed
