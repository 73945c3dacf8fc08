"""Every config in configs/ loads, validates, documents its command, and finetune.py fits its weights."""

import pathlib

import pytest

from fdnc_jax.model.fdnc import ModelConfig
from fdnc_jax.sim.config import SimConfig
from fdnc_jax.train.config_files import get_config
from fdnc_jax.train.loop import initial_model

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_validates_and_documents_its_command(path):
    config = get_config(path)
    ModelConfig.from_dict(config.model)
    SimConfig.from_dict(config.sim).validate()
    assert config.train.steps > 0 and config.train.batch_size > 0
    doc = config.get_config.__doc__ if hasattr(config, "get_config") else None
    module_doc = path.read_text().split('"""')[1]
    assert "fdnc-train" in (doc or module_doc) and f"configs/{path.name}" in (doc or module_doc)


def test_finetune_config_matches_the_shipped_weights():
    config = get_config(pathlib.Path(__file__).resolve().parents[1] / "configs" / "finetune.py")
    model = initial_model(
        ModelConfig.from_dict(config.model), config.seed, config.train.init_weights
    )
    assert model.config.canonical_pose and model.num_params == 3_558_785
