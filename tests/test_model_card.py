"""The model card (docs/MODEL.md) describes the model that ships: its label list is the bundled config's."""

import json
import re

from streamtag.modelfile import DEFAULT_MODEL_DIR

from .conftest import REPO


def test_model_card_lists_exactly_the_bundled_labels():
    card = (REPO / "docs" / "MODEL.md").read_text()
    section = card.split("## Label set", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"`([a-z_]+)`", section)
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert sorted(listed) == sorted(config["labels"]) and len(listed) == len(set(listed))
    assert f"{len(config['labels'])} classes" in section


def test_bundled_model_is_multi_label_and_level_normalised():
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert config["output"] == "sigmoid" and config["arch_params"]["level_seconds"] > 0
    esc50 = (REPO / "streamtag" / "training" / "teacher_map.tsv").read_text().splitlines()[1:51]
    assert {line.split("\t")[0] for line in esc50} <= set(config["labels"])  # every ESC-50 name, as before
    assert {"speech", "music"} <= set(config["labels"])
