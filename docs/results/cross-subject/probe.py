"""usage: probe.py CONFIG LABEL [encoder.safetensors|random] [feature_blocks[,...]] [override ...]
Rows (balanced accuracy mean±std over label-subset seeds per label fraction) appended to measurements.jsonl."""
import sys, json, time, os, numpy as np, torch
UNL, SUBJ = os.environ["TEMPLATES"], os.environ["SUBJECT"]  # packed template volumes, packed registered subject
torch.set_num_threads(2)
from sslmed.config import load_config
from sslmed.data.sources import open_dataset
from sslmed import demo
from sslmed.eval.encoders import build_encoder
from sslmed.eval.reports import summarise
cfgname, label, enc, fb = sys.argv[1:5]
fbs = fb.split(",")
cfg = load_config(cfgname, [f"data.path={UNL}", "eval.label_fractions=[0.1,1.0]", "eval.seeds=[0,1,2]",
                            f"model.feature_blocks={fbs[0]}"] + sys.argv[5:])
cfg.eval.encoder = enc
t0 = time.time()
if enc != "random":
    import sslmed, json as js
    from sslmed.models import rebuild_backbone
    from safetensors.torch import load_file
    info = js.load(open(enc.replace(".safetensors", ".json")))
    encs = {}
    for f in fbs:
        info["kwargs"]["feature_blocks"] = int(f)
        e = rebuild_backbone(info); e.load_state_dict(load_file(enc)); e.eval(); encs[f] = e
else:
    e = build_encoder(cfg, seed=cfg.train.seed)
S = cfg.data.crop_size
T = open_dataset(UNL); key = next(k for k in T.keys if "_t1_" in k)
I = open_dataset(SUBJ)
tr = demo.roi_crops(T, key, S, 4, demo.JITTER_MM, 0)
te = demo.roi_crops(I, I.keys[0], S, 4, demo.JITTER_MM, 1)
if enc == "random": encs = {fbs[0]: e}
same = demo.same_template_task(cfg, encs, tr)
cross = demo.cross_subject_task(cfg, encs, tr, te)
def ba(r, name, f): s = r["encoders"][name]["summary"][str(f)]["balanced_accuracy"]; return f"{s['mean']:.3f}±{s['std']:.3f}"
for x in encs:
    line = {"label": f"{label}-fb{x}"}
    for f in cfg.eval.label_fractions:
        line.update({f"cross{f * 100:g}": ba(cross, x, f), f"same{f * 100:g}": ba(same, x, f),
                     f"int_cross{f * 100:g}": ba(cross, "intensity-only", f)})
    line["sec"] = round(time.time() - t0)
    print(json.dumps(line)); open("measurements.jsonl", "a").write(json.dumps(line) + "\n")
