"""`eft models NAME`: every registered mechanism's card in full (generated from the registry), allowed
values read from the mechanism itself, the measured rows of a bench file, and bad input (exit 2)."""

from __future__ import annotations

import json

import pytest

import efficient_transformers as et
from efficient_transformers import cli, model_card, registry
from efficient_transformers.bench import analysis, harness, runner


def tiny_bench(names=("vanilla", "performer"), device_name=None) -> dict:
    config = runner._config(list(names), False, [256, 512], ["train"], 1, 256, 4, "float32", False, "cpu", True,
                            harness.TimingPlan(3, 3, 1.0, 30.0, 0.01), runner.QUICK_EFFORT)
    config.update(complete=True, device_name=device_name or config["device_name"])
    rows = []
    for name in names:
        for n in (256, 512):
            row = runner._empty_row(harness.Workload(name, n, "train"))
            t = 1e-4 * n * n if name == "vanilla" else 0.02 * n
            row.update(time_ms=t, peak_mem_mb=0.01 * n, time_ratio_vs_vanilla=t / (1e-4 * n * n))
            row["speedup_vs_vanilla"] = 1 / row["time_ratio_vs_vanilla"]
            rows.append(row)
    analysis.add_memory_ratios(rows)
    summary = analysis.summarize(rows, {n: registry.card(n).complexity for n in names})
    return {"config": config, "rows": rows, "summary": summary}


@pytest.mark.parametrize("name", [c.name for c in et.mechanisms()])
def test_every_card_in_full(name, capsys):
    card = et.card(name)
    assert cli.main(["models", name]) == 0
    out = capsys.readouterr().out
    for expected in (card.title, card.paper, card.complexity, card.decoding, str(card.year),
                     *[f"{c}: {registry.TAXONOMY[c]}" for c in card.classes]):
        assert expected in out, expected
    for option, default in card.options.items():
        assert f"  {option} = {default!r}" in out
    assert "Method (from the docstring of" in out and "O(" in out  # the equation and cost paragraphs
    assert cli.main(["models", name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["card"] == json.loads(json.dumps(card.to_json()))
    assert [o["name"] for o in info["options"]] == list(card.options)
    assert info["description"] and info["docstring"].startswith(info["description"][0])


def test_allowed_values_come_from_the_mechanism():
    from efficient_transformers.attention import linformer, performer

    info = {o["name"]: o for o in model_card.card_info("linformer")["options"]}
    assert info["sharing"]["allowed"] == list(linformer.SHARING) and info["k"]["allowed"] is None
    assert "headwise" in info["sharing"]["doc"]
    perf = {o["name"]: o for o in model_card.card_info("performer")["options"]}
    assert perf["features"]["allowed"] == list(performer.FEATURES) and perf["orthogonal"]["allowed"] == [True, False]


def test_bench_rows_of_the_mechanism(tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(tiny_bench()))
    assert cli.main(["models", "performer", "--bench", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Measured (" in out and "| train | 512 | 10.24 " in out and "2.56×" in out
    assert "faster than vanilla from: N = 256" in out
    assert cli.main(["models", "performer", "--bench", str(path), "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)["bench"]
    assert [r["seq_len"] for r in bench["rows"]] == [256, 512] and bench["summary"]["train"]["crossover_len"] == 256


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    assert cli.main(["models", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown mechanism 'nosuch'" in err and "registered" in err and "vanilla" in err
    assert cli.main(["models", "linear"]) == 2
    assert "did you mean 'linear_transformer'" in capsys.readouterr().err
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(tiny_bench(names=("vanilla",))))
    assert cli.main(["models", "performer", "--bench", str(path)]) == 2
    assert "has no rows for 'performer'; it measured: ['vanilla']" in capsys.readouterr().err
    path.write_text(json.dumps(tiny_bench(device_name="Elsewhere CPU (8 logical CPUs)")))
    assert cli.main(["models", "performer", "--bench", str(path)]) == 2
    assert "measured on another machine: cpu 'Elsewhere CPU (8 logical CPUs)'" in capsys.readouterr().err
    assert cli.main(["models", "performer", "--bench", str(path), "--any-machine"]) == 0
    capsys.readouterr()
    path.write_text(json.dumps([1, 2]))
    assert cli.main(["models", "performer", "--bench", str(path)]) == 2
    assert "is not an `eft bench` result" in capsys.readouterr().err
    assert cli.main(["models", "--bench", str(path)]) == 2
    assert "--bench needs a mechanism NAME" in capsys.readouterr().err


def test_without_name_table_1_is_unchanged(capsys):
    assert cli.main(["models"]) == 0
    assert capsys.readouterr().out.startswith("| Model")
