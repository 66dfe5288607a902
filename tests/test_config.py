from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from recsift.cli import main
from recsift.config import ConfigError, load_config


def test_precedence_defaults_yaml_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    yml = tmp_path / "c.yaml"
    yml.write_text("stream:\n  topic: from-yaml\n  group_id: yaml-group\n  partitions: 5\nwindow:\n  max_history: 20\n")
    monkeypatch.setenv("RECSIFT_STREAM__TOPIC", "from-env")
    monkeypatch.setenv("RECSIFT_WINDOW__MAX_HISTORY", "30")
    cfg = load_config(yml, {"window.max_history": 7})
    assert cfg.stream.topic == "from-env"  # env beats YAML
    assert cfg.stream.group_id == "yaml-group"  # YAML beats defaults
    assert cfg.stream.partitions == 5
    assert cfg.window.max_history == 7  # overrides beat env
    assert cfg.window.window_seconds == 3600.0  # default


def test_errors_name_the_field_and_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["stream.partitions=-3"])
    assert "stream.partitions" in str(err.value) and "-3" in str(err.value)
    monkeypatch.setenv("RECSIFT_STREAM__NOT_A_FIELD", "1")
    with pytest.raises(ConfigError, match=r"stream\.not_a_field"):
        load_config()


def test_cross_field_validation() -> None:
    with pytest.raises(ConfigError, match="backpressure_low"):
        load_config(overrides={"stream.backpressure_low": 10, "stream.backpressure_high": 5})
    with pytest.raises(ConfigError, match="file_path"):
        load_config(overrides={"stream.source": "file"})


def test_missing_yaml_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(ValidationError):
        cfg.stream.topic = "x"  # type: ignore[misc]


def test_config_show_masks_secrets(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RECSIFT_ADMIN__TOKEN", "tok-very-secret")
    monkeypatch.setenv("RECSIFT_STREAM__SASL_PASSWORD", "pw-very-secret")
    assert main(["config", "show", "--set", "stream.topic=shown"]) == 0
    out = capsys.readouterr().out
    assert "shown" in out and "**********" in out
    assert "very-secret" not in out
    cfg = load_config()
    assert "very-secret" not in repr(cfg) and "very-secret" not in str(cfg.masked())


def test_cli_reports_bad_config_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--set", "window.max_history=0"]) == 2
    err = capsys.readouterr().err
    assert "window.max_history" in err and "(got 0)" in err


def test_run_applies_the_configured_log_level(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    src = tmp_path / "e.jsonl"
    src.write_text('{"event_id": "1", "user_id": "u", "item_id": "i", "timestamp": 1}\n')
    root = logging.getLogger()
    before = root.level
    try:
        assert main(["run", "--input", str(src), "--state-dir", str(tmp_path / "s"), "--no-progress",
                     "--set", "monitoring.log_level=WARNING", "--set", "monitoring.port=0"]) == 0
        assert root.level == logging.WARNING
    finally:
        root.setLevel(before)


def test_a_moved_setting_fails_with_an_error_naming_its_new_place() -> None:
    with pytest.raises(ConfigError, match=r"lissa_depth moved to scoring\.scorer\.depth"):
        load_config(overrides={"scoring.lissa_depth": 20})
    with pytest.raises(ConfigError, match=r"strata moved to selection\.selector\.strata"):
        load_config(overrides={"selection.strata": 20})


def test_component_sections_take_a_type_and_its_options_and_the_registry_checks_them() -> None:
    from recsift.service import check_components

    cfg = load_config(overrides={"scoring.scorer.depth": 20, "selection.selector.strata": 8})
    assert (cfg.scoring.scorer.type, cfg.scoring.scorer.options()) == ("dealrec", {"depth": 20})
    assert load_config(overrides={"scoring.scorer": "loss"}).scoring.scorer.type == "loss"
    check_components(cfg)
    with pytest.raises(ConfigError, match=r"scoring\.scorer: .*depth"):
        check_components(load_config(overrides={"scoring.scorer.depth": -1}))
    with pytest.raises(ConfigError, match=r"selection\.selector: unknown selector type 'fifo'"):
        check_components(load_config(overrides={"selection.selector": "fifo"}))
    with pytest.raises(ConfigError, match="drift metrics"):
        load_config(overrides={"trainer.drift_thresholds": {"target_jss": 0.3}})


def test_promotion_hook_targets_are_checked_and_their_secrets_never_printed(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    hooks = ('[{"type": "vllm", "url": "http://vllm:8000", "api_key": "key-very-secret"},'
             ' {"type": "webhook", "url": "https://hooks.example/recsift", "secret": "hmac-very-secret"}]')
    monkeypatch.setenv("RECSIFT_TRAINER__ON_PROMOTE", hooks)
    cfg = load_config()
    assert [t.type for t in cfg.trainer.on_promote] == ["vllm", "webhook"]
    assert main(["config", "show"]) == 0
    assert "very-secret" not in capsys.readouterr().out and "very-secret" not in repr(cfg)
    with pytest.raises(ConfigError, match="needs a secret"):  # an unsigned webhook is refused
        load_config(overrides={"trainer.on_promote": [{"type": "webhook", "url": "https://x"}]})
    with pytest.raises(ConfigError, match="http") as bad:  # a bad URL; the error masks the secret beside it
        load_config(overrides={"trainer.on_promote": [{"type": "webhook", "url": "ftp://x", "secret": "s-very-secret"}]})
    assert "very-secret" not in str(bad.value)
