"""Generate radground/data/label_map.json: the merged 121-class label space of docs/method.md.

Ids and names come from the ``totalsegmentator`` package's own class maps — never typed
by hand: the 117 classes of task ``total`` keep their ids; the classes of ``total_mr``
map onto them by name, and the four MR-only classes are appended as 118-121 in the
order docs/method.md fixes. Side, body region and group are derived from the names by rules.

    pip install --no-deps totalsegmentator==2.18.0   # the class maps only; no weights
    python scripts/generate_label_map.py [OUT.json]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from totalsegmentator.map_to_binary import class_map

OUT = Path(__file__).resolve().parents[1] / "radground" / "data" / "label_map.json"
MR_ONLY_ORDER = ("lung_left", "lung_right", "intervertebral_discs", "vertebrae")  # docs/method.md: 118-121

_REGION_RULES = [  # first match wins
    (r"^vertebrae_C|^brain$|^skull$|^thyroid_gland$|^common_carotid", "head_neck"),
    (r"^vertebrae_T|^lung|^heart$|^aorta$|^pulmonary_vein$|^brachiocephalic|^subclavian|^atrial_appendage"
     r"|^superior_vena_cava$|^esophagus$|^trachea$|^rib_|^sternum$|^costal_cartilages$|^scapula|^clavicula",
     "thorax"),
    (r"^vertebrae_L|^spleen$|^kidney|^gallbladder$|^liver$|^stomach$|^pancreas$|^adrenal_gland|^small_bowel$"
     r"|^duodenum$|^colon$|^inferior_vena_cava$|^portal_vein|^autochthon|^iliopsoas", "abdomen"),
    (r"^vertebrae_S|^sacrum$|^urinary_bladder$|^prostate$|^iliac_|^femur|^hip_|^gluteus", "pelvis"),
    (r"^humerus", "upper_limb"),
    (r"^vertebrae$|^intervertebral_discs$|^spinal_cord$", "spine"),
]


def _side(name: str) -> str | None:
    tokens = name.split("_")
    return "left" if "left" in tokens else "right" if "right" in tokens else None


def _group(name: str) -> str:
    """The organ a class belongs to, without side, lobe or level: lung, rib, vertebrae, ..."""
    if name.startswith("vertebrae"):
        return "vertebrae"
    if name.startswith("lung"):
        return "lung"
    if name.startswith("rib_"):
        return "rib"
    if name.startswith("kidney_cyst"):
        return "kidney_cyst"
    return re.sub(r"_(left|right)$", "", name)


def _region(name: str) -> str:
    for pattern, region in _REGION_RULES:
        if re.search(pattern, name):
            return region
    raise SystemExit(f"no body region rule matches class {name!r}; add one to _REGION_RULES")


def build() -> list[dict]:
    total = {int(k): v for k, v in class_map["total"].items()}
    total_mr = {v: int(k) for k, v in class_map["total_mr"].items()}
    if sorted(total) != list(range(1, 118)):
        raise SystemExit(f"task total has {len(total)} classes; docs/method.md expects ids 1..117")
    mr_only = [name for name in total_mr if name not in total.values()]
    if sorted(mr_only) != sorted(MR_ONLY_ORDER):
        raise SystemExit(f"MR-only classes are {mr_only}; docs/method.md expects {list(MR_ONLY_ORDER)}")
    names = [(i, total[i], "total") for i in sorted(total)]
    names += [(118 + k, name, "total_mr") for k, name in enumerate(MR_ONLY_ORDER)]
    return [
        {"id": i, "name": name, "source_task": source, "mr_id": total_mr.get(name), "side": _side(name),
         "group": _group(name), "region": _region(name)}
        for i, name, source in names
    ]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT  # another path: compare, don't overwrite
    classes = build()
    out.write_text(json.dumps({"generated_by": "scripts/generate_label_map.py", "classes": classes}, indent=1)
                   + "\n", encoding="utf-8")
    print(f"wrote {len(classes)} classes to {out}")


if __name__ == "__main__":
    main()
