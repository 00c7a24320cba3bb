"""configs/default.yaml must say exactly what serving/config.py applies, so users reading it are not misled."""

from __future__ import annotations

import yaml

from serving.config import Config, load_config
from tests.paths import REPO

DEFAULT_YAML = REPO / "configs" / "default.yaml"


def test_default_yaml_lists_every_key_with_the_applied_default():
    raw = yaml.safe_load(DEFAULT_YAML.read_text())
    defaults = Config().model_dump(mode="json")
    assert set(raw) == set(defaults)
    for section, values in defaults.items():
        assert set(raw[section]) == set(values), f"{section}: keys differ"
    assert load_config(DEFAULT_YAML) == Config()


def test_torch_threads_default_to_the_nodes_cpus_shared_by_its_model_replicas():
    from serving.bootstrap import default_torch_threads

    assert default_torch_threads(2, 1) == 2  # a minimal config uses the machine, whatever Ray reserved
    assert default_torch_threads(16, 3) == 5
    assert default_torch_threads(1, 4) == 1  # never zero
    assert default_torch_threads(8, 0) == 8
