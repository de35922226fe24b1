"""The sweep over seeds (issue 20): --seeds parsing and validation, the hierarchical bootstrap against hand
computations, the medium recipe's sweep defaults, and the table / plot / per-word view with seed spread."""
import json
import math

import pytest

from fused_concept.training.bootstrap import hierarchical_bootstrap_ppl_diff, paired_bootstrap_ppl_diff
from fused_concept.training.cli import build_parser, main
from helpers.tiny import small_config, tiny_data, tiny_model


@pytest.mark.parametrize("value, named", [
    ("1,x", "--seeds 1,x: must be comma-separated integers"),
    ("", "--seeds : must be comma-separated integers"),
    ("1,,2", "--seeds 1,,2: must be comma-separated integers"),
    ("1,1", "--seeds 1,1: the seeds must differ"),
    ("-1", "--seeds -1: each seed must be an integer >= 0"),
    ("2,-3", "--seeds 2,-3: each seed must be an integer >= 0"),
])
def test_bad_seeds_are_one_line_and_exit_2(capsys, no_slow_work, value, named):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", f"--seeds={value}", "--no-word-similarity"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.endswith("\n"), err
    assert f"fused-concept sweep: error: {named}" in err and "Traceback" not in err


def test_seeds_parse_and_the_medium_recipe_gives_its_sweep_defaults():
    from fused_concept.training import recipes
    from fused_concept.training.cli import _config
    from fused_concept.training.config import TrainConfig, resolve_schedule
    from fused_concept.training.sweep import parse_seeds

    assert parse_seeds("1,2,3") == [1, 2, 3] and parse_seeds(" 7") == [7]
    assert recipes.sweep_defaults("medium") == {"lam": [0.0, 0.25, 0.5], "seeds": "1,2,3"}
    assert recipes.sweep_defaults("paper") == {}
    args, config = _config(build_parser(), ["sweep", "--recipe", "medium"])
    assert args.lam == [0.0, 0.25, 0.5] and args.seeds == "1,2,3"
    assert (config.num_train, config.num_heldout, config.batch_size) == (80, 40, 4)
    assert resolve_schedule(config).steps == 100 and resolve_schedule(config).warmup_steps == 8
    args, _ = _config(build_parser(), ["sweep", "--recipe", "medium", "--seeds", "4,5", "--lam", "0", "1"])
    assert args.seeds == "4,5" and args.lam == [0.0, 1.0]  # options given explicitly win
    assert TrainConfig().num_train == 8  # the embedded default job is untouched


def test_hierarchical_bootstrap_matches_hand_computations():
    # one seed, rows NLL [0, ln 3] vs [0, 0]: the draws {0,0}, {0,ln3}, {ln3,ln3} give ppl differences
    # 0, sqrt(3) - 1, 2 with probability 1/4, 1/2, 1/4, so the 2.5th / 97.5th percentiles are 0 and 2
    diff, low, high, per_seed = hierarchical_bootstrap_ppl_diff([([0.0, math.log(3)], [0.0, 0.0])])
    assert diff == pytest.approx(math.sqrt(3) - 1) and per_seed == [pytest.approx(math.sqrt(3) - 1)]
    assert (low, high) == (pytest.approx(0.0), pytest.approx(2.0))
    rows = ([0.1, 0.5, 0.9, 0.2, 1.3], [0.2, 0.4, 0.7, 0.1, 1.0])
    assert hierarchical_bootstrap_ppl_diff([rows])[:3] == paired_bootstrap_ppl_diff(*rows)  # one seed: the same
    # two seeds whose rows are constant (no row noise): differences 3 - 2 = 1 and 0; resampling two seeds
    # gives means 0, 1/2, 1 with probability 1/4, 1/2, 1/4: the interval is [0, 1] around 1/2. An interval
    # from the rows alone (ignoring the seed spread) would be [1/2, 1/2].
    diff, low, high, per_seed = hierarchical_bootstrap_ppl_diff(
        [([math.log(3)] * 6, [math.log(2)] * 6), ([math.log(2)] * 4, [math.log(2)] * 4)])
    assert diff == pytest.approx(0.5) and per_seed == [pytest.approx(1.0), pytest.approx(0.0)]
    assert (low, high) == (pytest.approx(0.0), pytest.approx(1.0))
    with pytest.raises(ValueError, match="paired rows differ"):
        hierarchical_bootstrap_ppl_diff([([0.0], [0.0, 1.0])])


def test_per_word_view_by_hand():
    from fused_concept.training.per_word import format_word_table, word_changes

    def rows(nll):
        return {"nll": nll, "content": [True, True, True, False, True], "target": [5, 5, 7, 5, 9],
                "set_size": [3, 3, 1, 1, 2]}

    twin = [rows([1.0, 1.0, 2.0, 0.0, 1.0]), rows([1.0, 1.0, 2.0, 0.0, 1.0])]
    run = [rows([0.5, 0.7, 2.5, 9.0, 1.0]), rows([0.3, 0.5, 2.0, 9.0, 1.0])]
    view = word_changes(run, twin, min_count=1)
    by_id = {w["id"]: w for w in view["gains"]}
    assert by_id[5]["mean_change"] == pytest.approx((0.5 + 0.3 + 0.7 + 0.5) / 4)  # the non-content row is out
    assert by_id[5]["count"] == 2 and by_id[5]["synonyms"] == 2
    assert view["losses"][0]["id"] == 7 and view["losses"][0]["mean_change"] == pytest.approx(-0.25)
    assert view["by_synonyms"]["gold only"] == {"mean_change": pytest.approx(-0.25), "rows": 1}
    assert [w["id"] for w in word_changes(run, twin, min_count=2)["gains"]] == [5]
    assert "| 1 | `<5>` | +0.500 | 2 | 2.0 | `<7>` | -0.250 | 1 | 0.0 |" in format_word_table("0.5", view)


def test_sweep_over_seeds_table_plot_and_intervals(tmp_path, monkeypatch):
    import matplotlib.figure

    from fused_concept.training.sweep import _rows, sweep

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    out = tmp_path / "sweep"
    config = small_config(tmp_path, steps=2, lora=False)
    summary = sweep(config, [0.0, 0.5], str(out), seeds=[1, 2], model=tiny_model(), tokenizer=None, data=tiny_data())
    for seed in (1, 2):
        recorded = json.loads((out / f"seed-{seed}" / "lam-0.5" / "metrics.json").read_text())
        assert recorded["config"]["seed"] == seed and recorded["config"]["lam"] == 0.5
    assert summary["seeds"] == [1, 2] and json.loads((out / "sweep.json").read_text())["seeds"] == [1, 2]
    run, key = summary["runs"]["0.5"], "heldout.content_perplexity"
    assert len(run["per_seed"]) == 2 and run["after"][key] == pytest.approx(
        (run["per_seed"][0][key] + run["per_seed"][1][key]) / 2)
    pairs = [(_rows(str(out / f"seed-{s}" / "lam-0.5")), _rows(str(out / f"seed-{s}" / "lam-0"))) for s in (1, 2)]
    pairs = [([x for x, c in zip(a["nll"], a["content"]) if c], [x for x, c in zip(b["nll"], b["content"]) if c])
             for a, b in pairs]
    diff, low, high, per_seed = hierarchical_bootstrap_ppl_diff(pairs)
    assert run["diff_vs_twin"][key] == {"diff": diff, "ci95": [low, high], "per_seed": per_seed}
    assert per_seed[0] != per_seed[1]  # the seeds differ, so there is a spread to include
    text = (out / "sweep.md").read_text()
    assert "--seeds 1,2" in text and "±" in text and f"({diff:+.2f} [{low:+.2f}, {high:+.2f}])" in text
    assert f"{per_seed[0]:+.2f} / {per_seed[1]:+.2f}" in text  # each seed's difference from its twin
    assert "Per-word change in gold log-probability, lam 0.5 vs lam 0" in text and "| 1 | `<" in text
    dots = [c for ax in figures[-1].axes for c in ax.collections if c.get_label() == "each seed"]
    assert dots and all(len(c.get_offsets()) == 4 for c in dots)  # 2 seeds x 2 lambdas on every panel
