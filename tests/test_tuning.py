"""The tuner's objective: ppl under an average-bits budget."""

import pytest

from streamkv.lab.tuning import Budget, lookup, objective

RESULTS = {"metrics": {"ppl": 20.0}, "compression": {"avg_bits": 4.5}}


def test_lookup_follows_dotted_keys_and_names_what_is_missing():
    assert lookup(RESULTS, "metrics.ppl") == 20.0
    with pytest.raises(KeyError, match="metrics.nll"):
        lookup(RESULTS, "metrics.nll")


def test_within_budget_the_objective_is_the_metric():
    value, attrs = objective(RESULTS, "metrics.ppl", Budget(max=5.0))
    assert value == 20.0 and attrs["feasible"] and attrs["compression.avg_bits"] == 4.5


def test_over_budget_the_objective_is_penalised_per_bit_over():
    value, attrs = objective(RESULTS, "metrics.ppl", Budget(max=4.0, penalty=2.0))
    assert value == pytest.approx(20.0 * (1 + 2.0 * 0.5)) and not attrs["feasible"]
    assert objective(RESULTS, "metrics.ppl", Budget(max=4.0), "maximize")[0] == pytest.approx(20.0 / 1.5)


def test_no_budget_and_uncompressed_jobs():
    assert objective(RESULTS, "metrics.ppl", Budget(max=None))[0] == 20.0
    assert objective({"metrics": {"ppl": 10.0}}, "metrics.ppl", Budget(max=4.0))[1]["excess"] == 12.0  # as 16-bit


def test_search_space_from_hydra_grammar_and_the_command_line_wins(monkeypatch):
    import optuna
    from omegaconf import OmegaConf

    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    from hydra_plugins.streamkv_optuna_sweeper.sweeper import OptunaSweeper

    params = {"a": "choice(2, 3)", "b": "interval(0.5, 1.0)", "c": "range(0, 8, 2)", "d": "int(interval(1, 4))"}
    sweeper = OptunaSweeper("metrics.ppl", "minimize", 3, 1, 0, 2, None, None, OmegaConf.create({}),
                            OmegaConf.create(params))
    space, fixed = sweeper.space(["a=4", "e=choice(x, y)"])
    assert fixed == ["a=4"] and sorted(space) == ["b", "c", "d", "e"]
    trial = optuna.trial.FixedTrial({"b": 0.7, "c": 6, "d": 2, "e": "y"})
    assert {k: s(trial) for k, s in space.items()} == {"b": 0.7, "c": 6, "d": 2, "e": "y"}
