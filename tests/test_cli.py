"""The command line: eft models (text and JSON), python -m efficient_transformers."""

import json
import subprocess
import sys

import efficient_transformers as et
from efficient_transformers.cli import main


def test_models_table_follows_the_survey_order(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = [h.strip() for h in out[0].strip("|").split("|")]
    assert header == ["Model", "Year", "Complexity", "Decode", "Class"]
    titles = [line.strip("|").split("|")[0].strip() for line in out[2:]]
    assert titles == [c.title for c in et.mechanisms()]
    assert titles[0] == "Transformer"


def test_models_json_lists_every_card(capsys):
    assert main(["models", "--json"]) == 0
    cards = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in cards] == [c.name for c in et.mechanisms()]
    assert set(cards[0]) >= {"name", "title", "paper", "year", "complexity", "classes", "causal", "bidirectional", "options"}


def test_python_dash_m_runs_the_same_cli():
    out = subprocess.run([sys.executable, "-m", "efficient_transformers", "models"], capture_output=True, text=True, check=True)
    assert "| Transformer" in out.stdout
