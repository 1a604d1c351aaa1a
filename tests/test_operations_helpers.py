"""Pure helpers of the rollout driver and the operations: per-revision stats, overrides."""
from __future__ import annotations

from controller.latency import bucket_of
from controller.loader import load_text
from controller.operations import overlay, spec_from_revision
from controller.policy.rollout import (Done, Observed, RolloutSpec, RolloutState, SetWeights, StartOld, StopNew,
                                       abort)
from controller.rollouts import describe_actions, revision_stats
from controller.store import RevisionRow

from conftest import deployment_yaml


def hist(*ms: float) -> dict:
    h: dict = {}
    for m in ms:
        h[str(bucket_of(m))] = h.get(str(bucket_of(m)), 0) + 1  # as it arrives over JSON
    return h


def test_revision_stats_add_reports_since_the_step_and_merge_histograms():
    reports = [
        (9.0, True, 50, 50, hist(*[5.0] * 50)),  # before the step: ignored
        (10.0, True, 10, 1, hist(*[5.0] * 9, 400.0)),
        (10.5, False, 100, 0, hist(*[5.0] * 100)),
        (11.0, True, 90, 0, hist(*[5.0] * 90)),
    ]
    old, new = revision_stats(reports, since=10.0)
    assert (old.requests, old.errors) == (100, 0)
    assert (new.requests, new.errors) == (100, 1)
    assert 4.5 < old.p99_ms < 5.5
    assert 4.5 < new.p99_ms < 5.5  # one slow request in 100 is the 100th percentile, not the 99th
    _, new_all = revision_stats(reports, since=0.0)
    assert new_all.requests == 150 and new_all.errors == 51


def test_revision_stats_without_traffic():
    old, new = revision_stats([], since=0.0)
    assert (old.requests, new.requests, new.p99_ms) == (0, 0, 0.0)


def test_abort_rolls_back_from_any_phase_and_restores_the_old_set():
    spec = RolloutSpec("rolling", 3)
    obs = Observed(old_ready=1, new_ready=2, new_starting=0, new_failed=0, old_total=1, new_total=2)
    state, actions = abort(spec, obs, RolloutState("progressing"), "manual rollback")
    assert state.phase == "rolled_back"
    assert actions == [SetWeights(100.0, 0.0), StartOld(2), StopNew(2), Done("rolled_back", "manual rollback")]
    assert abort(spec, obs, state, "again") == (state, [])
    assert describe_actions(actions) == "traffic old 100% / new 0%, start 2 old, stop 2 new"


def test_overlay_lays_scale_and_state_over_the_file_without_changing_the_revision():
    spec = load_text(deployment_yaml("o", max_replicas=3), "o.yaml").deployments[0]
    scaled = overlay(spec, {"replicas": 2, "state": "stopped"})
    assert (scaled.scaling.min_replicas, scaled.scaling.max_replicas, scaled.state) == (2, 3, "stopped")
    assert scaled.revision == spec.revision and scaled.template_hash == spec.template_hash
    assert overlay(spec, {}) == spec


def test_a_stored_revision_loads_back_to_the_same_revision():
    spec = load_text(deployment_yaml("o", extra_spec="env: {A: '1'}"), "o.yaml").deployments[0]
    row = RevisionRow("o", 1, spec.revision, 0.0, "o.yaml", spec.raw)
    again = spec_from_revision(row)
    assert again.revision == spec.revision and again.env == {"A": "1"}


def test_validate_notes_a_rename_since_the_last_commit(tmp_path):
    import io
    import subprocess

    from controller.validate import EXIT_OK, run_validate

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=tmp_path,
                       check=True, capture_output=True)
    f = tmp_path / "svc.yaml"
    f.write_text(deployment_yaml("old-name"))
    git("init", "-q")
    git("add", "svc.yaml")
    git("commit", "-q", "-m", "first")
    out, err = io.StringIO(), io.StringIO()
    assert run_validate([str(f)], out, err) == EXIT_OK
    assert "note:" not in out.getvalue()
    f.write_text(deployment_yaml("new-name"))
    out = io.StringIO()
    assert run_validate([str(f)], out, io.StringIO()) == EXIT_OK  # a rename is allowed: it is a note
    assert (f"note: {f}: metadata.name old-name -> new-name since the last commit: a name cannot change, so this "
            "is a new deployment (new-name, endpoint /d/new-name/) and old-name will be removed (instances "
            "drained, endpoint /d/old-name/ gone)") in out.getvalue()
