"""The merged 121-class label space: ids as docs/method.md states them, generated from totalsegmentator."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from radground.labels import CLASS_TOKENS, NUM_CLASSES, label_map

ROOT = Path(__file__).resolve().parents[1]

# docs/method.md's examples, typed here independently of the generated file.
DOMAIN_IDS = {1: "spleen", 2: "kidney_right", 5: "liver", 10: "lung_upper_lobe_left", 27: "vertebrae_L5",
              51: "heart", 52: "aorta", 90: "brain", 118: "lung_left", 119: "lung_right",
              120: "intervertebral_discs", 121: "vertebrae"}


def test_ids_are_contiguous_and_match_domain():
    labels = label_map()
    assert len(labels) == NUM_CLASSES == 121 <= CLASS_TOKENS
    assert [c.id for c in labels] == list(range(1, 122))
    for class_id, name in DOMAIN_IDS.items():
        assert labels.by_id(class_id).name == name
        assert labels.by_name(name).id == class_id


def test_side_group_region_rules():
    labels = label_map()
    assert labels.by_name("kidney_left").side == "left" and labels.by_name("liver").side is None
    assert {c.name for c in labels.in_group("lung")} >= {"lung_left", "lung_right", "lung_middle_lobe_right"}
    assert len(labels.in_group("rib")) == 24 and len(labels.in_group("vertebrae")) == 26
    assert labels.by_name("vertebrae_T8").region == "thorax" and labels.by_name("vertebrae_L5").region == "abdomen"
    assert labels.by_name("lung_left").source_task == "total_mr" and labels.by_name("lung_left").mr_id == 10
    with pytest.raises(KeyError, match="not in the label map"):
        labels.by_name("lung")


def test_committed_label_map_is_what_the_script_generates(tmp_path):
    # TotalSegmentator is in the dev extras (its label tables only, without nnU-Net): this check always runs.
    committed = (ROOT / "radground" / "data" / "label_map.json").read_text()
    out = tmp_path / "label_map.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_label_map.py"), str(out)], check=True)
    regenerated = out.read_text()
    assert json.loads(regenerated) == json.loads(committed)
