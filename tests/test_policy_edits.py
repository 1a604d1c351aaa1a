"""The guide's edit rules as a pure classification, and the field diff `history` shows."""
from __future__ import annotations

import copy

from controller.policy.edits import (IN_PLACE, NONE, RESTART, ROLLOUT, classify, describe, kind_of,
                                     rename_message, spec_diff)

BASE = {
    "apiVersion": "autodeploy/v1", "kind": "Deployment",
    "metadata": {"name": "bert", "description": "BERT", "environment": "production"},
    "spec": {
        "model": {"id": "bert", "version": "v1"}, "command": "python serve.py --port ${PORT}", "port": 8080,
        "env": {"LOG_LEVEL": "info"},
        "resources": {"cpu": 4, "memoryGb": 16, "gpu": {"count": 1, "type": "A100"}},
        "scaling": {"minReplicas": 1, "maxReplicas": 5, "autoscaling": {"enabled": True, "targetCpuUtilization": 70}},
        "loadBalancer": {"algorithm": "round-robin", "healthCheck": {"path": "/health", "intervalSeconds": 30}},
        "rollout": {"strategy": "canary"},
    },
}


def edited(**paths: object) -> dict:
    doc = copy.deepcopy(BASE)
    for dotted, value in paths.items():
        node = doc
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if value is None:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return doc


def test_guide_editable_fields_apply_in_place():
    for change in (dict(metadata__description="new"), dict(spec__scaling__minReplicas=2),
                   dict(spec__scaling__maxReplicas=9), dict(spec__scaling__autoscaling__targetCpuUtilization=80),
                   dict(spec__loadBalancer__healthCheck__intervalSeconds=10),
                   dict(spec__loadBalancer__algorithm="least-connections"),
                   dict(spec__rollout__strategy="rolling"), dict(metadata__environment="staging")):
        edit = classify(BASE, edited(**change))
        assert edit.kind == IN_PLACE, change


def test_env_and_resources_need_new_instances():
    assert classify(BASE, edited(spec__env__LOG_LEVEL="debug")).kind == RESTART
    assert classify(BASE, edited(spec__resources__cpu=8)).kind == RESTART
    assert classify(BASE, edited(spec__resources__memoryGb=32)).kind == RESTART
    assert classify(BASE, edited(spec__resources__gpu__count=2)).kind == RESTART
    # Bandwidth is informational: no process sees it.
    assert classify(BASE, edited(spec__resources__bandwidthMbps=1000)).kind == IN_PLACE


def test_model_image_command_port_go_through_the_rollout_strategy():
    for change in (dict(spec__model__version="v2"), dict(spec__model__id="bert-large"),
                   dict(spec__image="example/bert:v2"), dict(spec__command="python serve2.py"),
                   dict(spec__port=9000)):
        assert classify(BASE, edited(**change)).kind == ROLLOUT, change


def test_the_strongest_change_decides():
    edit = classify(BASE, edited(metadata__description="x", spec__env__A="1", spec__model__version="v2"))
    assert edit.kind == ROLLOUT
    assert edit.paths() == ["metadata.description", "spec.env.A", "spec.model.version"]
    assert [c.kind for c in edit.changes] == [IN_PLACE, RESTART, ROLLOUT]


def test_no_change_and_first_revision():
    assert classify(BASE, copy.deepcopy(BASE)).kind == NONE
    first = classify(None, BASE)
    assert first.kind == ROLLOUT and first.renamed_from is None  # everything is new


def test_diff_names_each_map_key_and_says_added_removed_changed():
    changes = spec_diff(BASE, edited(spec__env__LOG_LEVEL=None, spec__env__MODE="fast",
                                     spec__scaling__maxReplicas=10))
    assert [str(c) for c in changes] == [
        "spec.env.LOG_LEVEL: removed (was info)",
        "spec.env.MODE: set to fast",
        "spec.scaling.maxReplicas: 5 -> 10",
    ]


def test_diff_of_a_long_command_shows_where_it_differs():
    long = "/opt/venv/bin/python /srv/models/bert/serve.py --port ${PORT} --workers 2 --dtype fp16"
    change = spec_diff(edited(spec__command=long), edited(spec__command=long.replace("fp16", "bf16")))[0]
    assert str(change) == "spec.command: ...s 2 --dtype fp16 -> ...s 2 --dtype bf16"


def test_lists_compare_whole():
    a, b = edited(spec__rollout__steps=[10, 100]), edited(spec__rollout__steps=[20, 100])
    assert [str(c) for c in spec_diff(a, b)] == ["spec.rollout.steps: [10, 100] -> [20, 100]"]


def test_a_rename_is_reported_as_one_not_as_a_field_change():
    edit = classify(BASE, edited(metadata__name="bert2"))
    assert edit.renamed_from == "bert" and edit.changes == ()


def test_unknown_fields_are_treated_as_needing_new_instances():
    assert kind_of("spec.futureField") == RESTART
    assert kind_of("spec.scaling.newKnob") == IN_PLACE


def test_describe_says_how_it_is_applied():
    assert describe(classify(BASE, edited(metadata__description="x")), "canary") == \
        "applied in place, no instance restarted (metadata.description: BERT -> x)"
    assert describe(classify(BASE, edited(spec__env__A="1")), "canary") == \
        "env changes reach a process only when it starts: rolling instances (spec.env.A: set to 1)"
    assert describe(classify(BASE, edited(spec__resources__cpu=8)), "canary") == \
        "resource changes need new instances: rolling instances (spec.resources.cpu: 4 -> 8)"
    assert describe(classify(BASE, edited(spec__model__version="v2")), "canary") == \
        "new version: canary rollout (spec.model.version: v1 -> v2)"


def test_rename_message_names_the_new_deployment():
    assert rename_message("a", "d/x.yaml", []) == "d/x.yaml no longer defines it: draining"
    assert rename_message("a", "d/x.yaml", ["b"]) == (
        "d/x.yaml no longer defines it: draining. metadata.name cannot change: if a was renamed to b, that is "
        "a new deployment with its own endpoint /d/b/, and a (endpoint /d/a/) is removed")
