"""usage: python experiment.py OUT [CONFIG] [override ...]

DrasCLR on registered brains, then the demo's cross-subject probe with located features:

1. pack the MNI152 2009 T1 template, its grey/white-matter maps and the ITK example T1 (brain-extracted,
   as the demo does), all at 1 mm and registered to the T1 template (`--atlas`) → OUT/atlas-pool;
2. pretrain CONFIG (default `drasclr-atlas-tiny`; atlas-grid sampling) on that pool → OUT/run;
3. crops around the 300 Seitzman-2018 ROI centres of the template (training) and of the ITK subject at the
   ROI centres mapped through its registration (test), each with its atlas location; linear probes
   (sslmed.eval) of the pretrained encoder and of the same architecture at random init, both fed each
   crop's location, plus the intensity-only baseline → OUT/results.{md,json}.

The ITK subject is in the (unlabelled) pretraining pool, as the issue asks; its labels never are.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str]) -> None:
    from sslmed import demo, load_encoder
    from sslmed.config import load_config
    from sslmed.data.sources import open_dataset
    from sslmed.eval.reports import write_json_atomic, write_text_atomic
    from sslmed.io.pack import pack
    from sslmed.io.synthetic import mni152_paths, write_itk_t1_brain
    from sslmed.methods import build_method
    from sslmed.models.location import accept_location
    from sslmed.train.loop import pretrain

    out = Path(argv[0])
    config = argv[1] if len(argv) > 1 else "drasclr-atlas-tiny"
    torch.set_num_threads(2)
    started = time.perf_counter()
    pool = out / "atlas-pool"
    template = mni152_paths()[0]
    if not (pool / "manifest.json").is_file():
        brain = write_itk_t1_brain(out / "volumes")
        pack([*map(str, mni152_paths()), str(brain)], str(pool), fmt="zarr", spacing=(1.0, 1.0, 1.0),
             modality="mr", dtype="int16", atlas=str(template))
    cfg = load_config(config, [f"run.dir={out / 'run'}", f"data.path={pool}", "checkpoint.resume=none",
                               "eval.label_fractions=[0.1,1.0]", "eval.seeds=[0,1,2]", *argv[2:]])
    run = pretrain(cfg)
    pretrain_seconds = time.perf_counter() - started

    torch.manual_seed(cfg.train.seed)  # the same architecture at random init, built as the method builds it
    random_init = accept_location(build_method(cfg, initialise=False).encoder().eval(), "atlas")
    encoders = {"pretrained": load_encoder(run / "encoder.safetensors"), "random-init": random_init}
    dataset = open_dataset(pool)
    t1 = next(k for k in dataset.keys if "_t1_" in k)
    subject = next(k for k in dataset.keys if "mni" not in k)
    size = cfg.data.crop_size
    template_rois = demo.roi_crops(dataset, t1, size, 4, demo.JITTER_MM, seed=0)
    subject_rois = demo.roi_crops(dataset, subject, size, 4, demo.JITTER_MM, seed=1)
    tasks = {"same-template": demo.same_template_task(cfg, encoders, template_rois),
             "cross-subject": demo.cross_subject_task(cfg, encoders, template_rois, subject_rois)}
    table = demo.tables(tasks)
    info = json.loads((run / "encoder.json").read_text())
    results = {"config": config, "overrides": argv[2:], "pool": dataset.keys,
               "subject_registration_metric": dataset.meta(subject)["atlas_metric"],
               "encoder_needs_location": info.get("needs_location"),
               "location_coordinates": info.get("location_coordinates"),
               "pretrain_seconds": round(pretrain_seconds, 1),
               "seconds": round(time.perf_counter() - started, 1), "tasks": tasks}
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "results.md", table + "\n")
    print(table)
    print(json.dumps({k: v for k, v in results.items() if k != "tasks"}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    np.set_printoptions(precision=3)
    main(sys.argv[1:])
