"""usage: probe.py CONFIG LABEL encoder.safetensors|random [override ...]
The demo's probes on one encoder, read as its encoder.json says (random: the config's architecture at
random init): same template (split by ROI), template → subject and subject → template. Rows (balanced
accuracy mean ± std over label-subset seeds per label fraction) appended to measurements.jsonl."""
import json
import os
import sys
import time

import torch

from sslmed import demo
from sslmed.config import load_config
from sslmed.data.sources import open_dataset
from sslmed.eval.encoders import build_encoder

TEMPLATES, SUBJECT = os.environ["TEMPLATES"], os.environ["SUBJECT"]  # packed template volumes, registered subject
torch.set_num_threads(2)
config, label, encoder_path = sys.argv[1:4]
cfg = load_config(config, [f"data.path={TEMPLATES}", "eval.label_fractions=[0.1,1.0]", "eval.seeds=[0,1,2]",
                           *sys.argv[4:]])
cfg.eval.encoder = encoder_path
started = time.time()
encoders = {label: build_encoder(cfg, seed=cfg.train.seed)}
templates, subjects = open_dataset(TEMPLATES), open_dataset(SUBJECT)
t1 = next(k for k in templates.keys if "_t1_" in k)
template = demo.roi_crops(templates, t1, cfg.data.crop_size, 4, demo.JITTER_MM, 0)
subject = demo.roi_crops(subjects, subjects.keys[0], cfg.data.crop_size, 4, demo.JITTER_MM, 1)
tasks = {"same": demo.same_template_task(cfg, encoders, template),
         "cross": demo.cross_subject_task(cfg, encoders, template, subject),
         "back": demo.cross_subject_task(cfg, encoders, subject, template)}
row = {"label": label}
for fraction in cfg.eval.label_fractions:
    for task, result in tasks.items():
        for name in (label, "intensity-only") if task != "same" else (label,):
            s = result["encoders"][name]["summary"][str(fraction)]["balanced_accuracy"]
            key = f"{task}{fraction * 100:g}" + ("" if name == label else "_intensity")
            row[key] = f"{s['mean']:.3f}±{s['std']:.3f}"
row["sec"] = round(time.time() - started)
print(json.dumps(row))
with open("measurements.jsonl", "a") as out:
    out.write(json.dumps(row) + "\n")
