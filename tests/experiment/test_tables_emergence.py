"""The run's tables report discovery against the behaviours that emerged in the organism build."""

from pairtrace.experiment.tables import _discovery_lines, _emergence_lines

EMERGENCE = [
    {"behaviour": "distractor_compliance", "kind": "contaminated", "prompts": "harmful/trigger", "m0": 0.01,
     "m1": 0.94, "emerged": True},
    {"behaviour": "sign_off", "kind": "benign", "prompts": "benign/all", "m0": 0.06, "m1": 0.08, "emerged": False},
]
DISCOVERY = {
    "pair_clustering": {"sizes": [50, 70, 1080], "n_clusters": 3},
    "labels": {"behaviours": [
        {"behaviour": "distractor_compliance", "n_total": 48, "n_in_matrix": 48, "best_cluster": 1,
         "precision": 0.96, "recall": 1.0},
        {"behaviour": "sign_off", "n_total": 72, "n_in_matrix": 72, "best_cluster": 2, "precision": 1.0,
         "recall": 0.97},
        {"behaviour": "harmful_compliance_decoy", "n_total": 120, "n_in_matrix": 0, "best_cluster": 0,
         "precision": 0.0, "recall": 0.0},
    ]},
}


def test_emergence_table_gives_both_models_and_the_verdict():
    text = "\n".join(_emergence_lines(EMERGENCE))
    assert "| distractor_compliance | contaminated | harmful/trigger | 1.0% | 94.0% | yes |" in text
    assert "| sign_off | benign | benign/all | 6.0% | 8.0% | no |" in text
    assert _emergence_lines([]) == []


def test_discovery_rows_say_whether_the_behaviour_emerged_and_mark_decoys():
    rows = [line for line in _discovery_lines(DISCOVERY, EMERGENCE) if line.startswith("| every")]
    assert rows[0].split(" | ")[1:3] == ["distractor_compliance", "yes"]
    assert rows[1].split(" | ")[1:3] == ["sign_off", "no"]
    assert rows[2].split(" | ")[1:3] == ["harmful_compliance_decoy", "decoy"]


def test_discovery_rows_without_an_organism_summary_say_n_a():
    rows = [line for line in _discovery_lines(DISCOVERY) if line.startswith("| every")]
    assert all(row.split(" | ")[2] == "n/a" for row in rows)
