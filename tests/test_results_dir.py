"""Where the experiment drivers write by default: a checkout's benchmarks/results/<group>, else
the current directory, never the installed package's folder."""

import lowrank
from lowrank._machine import default_results_dir


def test_outside_a_checkout_results_go_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_results_dir("da") == tmp_path
    assert not default_results_dir("da").is_relative_to(lowrank.__path__[0])


def test_in_a_checkout_results_go_to_their_group_under_benchmarks_results(tmp_path, monkeypatch):
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert default_results_dir("finetune") == tmp_path / "benchmarks" / "results" / "finetune"
