"""The streaming benchmark's bookkeeping at toy sizes (its timings are not tested): every mechanism runs
over the stream, and the recurrence mechanisms' state stops growing once their memories are full."""

import json

from efficient_transformers.bench.stream import _steady, main


def test_stream_benchmark_reports_a_bounded_state(tmp_path):
    args = ["--length", "96", "--segment", "16", "--mem", "16", "--dim", "16", "--heads", "2", "--repeats", "1",
            "--decode-tokens", "6", "--sliding-tokens", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = {r["mechanism"]: r for r in json.loads((tmp_path / "stream.json").read_text())["rows"]}
    assert set(rows) == {"transformer_xl", "compressive", "vanilla, recompute per segment",
                         "vanilla, sliding window per token"}
    xl = rows["transformer_xl"]
    assert len(set(xl["state_sizes"])) == 1 and set(xl["decode_state_sizes"]) == set(xl["state_sizes"])
    comp = rows["compressive"]["state_sizes"]
    assert comp[-1] == comp[-2] == comp[-3] and max(comp) == comp[-1]  # fills up, then constant
    decoded = rows["compressive"]["decode_state_sizes"]
    assert max(decoded) - min(decoded) <= 2 * 16 * 2  # per token: one raw state more or less per layer
    assert "constant" in (tmp_path / "stream.md").read_text()
    assert _steady([1, 2, 3, 3]) == "constant 3 from #3 of 4 (filling: [1, 2])"
    assert _steady([5, 4, 5, 4]) == "bounded: 4..5"
