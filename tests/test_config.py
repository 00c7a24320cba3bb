"""configs/default.yaml must say exactly what serving/config.py applies, so users reading it are not misled."""

from __future__ import annotations

from pathlib import Path

import yaml

from serving.config import Config, load_config

DEFAULT_YAML = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def test_default_yaml_lists_every_key_with_the_applied_default():
    raw = yaml.safe_load(DEFAULT_YAML.read_text())
    defaults = Config().model_dump(mode="json")
    assert set(raw) == set(defaults)
    for section, values in defaults.items():
        assert set(raw[section]) == set(values), f"{section}: keys differ"
    assert load_config(DEFAULT_YAML) == Config()
