"""Readout and probe variants on one set of weights (no retraining):
usage: readout.py LABEL CONFIG ENCODER.safetensors|random [override ...]
For feature_blocks 1..depth: features of template crops (probe train) and subject crops (test), then linear
probes with several feature normalisations at 10 % / 100 % labels, 3 seeds; same-template split by ROI too.
Rows appended to readout.jsonl."""
import sys, json, time, os, numpy as np, torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler, Normalizer
from sklearn.metrics import balanced_accuracy_score
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from sslmed.config import load_config
from sslmed.data.sources import open_dataset
from sslmed import demo
from sslmed.eval.encoders import build_encoder, extract_features
from sslmed.eval.subsets import label_subset, split_train_test
UNL, SUBJ = os.environ["TEMPLATES"], os.environ["SUBJECT"]  # packed template volumes, packed registered subject
label, cfgname, enc = sys.argv[1:4]
cfg = load_config(cfgname, [f"data.path={UNL}"] + sys.argv[4:])
S = cfg.data.crop_size
T = open_dataset(UNL); key = next(k for k in T.keys if "_t1_" in k)
I = open_dataset(SUBJ)
PER = int(os.environ.get("PER_ROI", "4"))
tr = demo.roi_crops(T, key, S, PER, demo.JITTER_MM, 0)
te = demo.roi_crops(I, I.keys[0], S, PER, demo.JITTER_MM, 1)
FBS = [int(x) for x in os.environ.get("FBS", "1,2,4").split(",")]
NORMS = os.environ.get("NORMS", "std,l2std").split(",")
def model(norm, seed):
    steps = {"std": [StandardScaler()], "l2std": [Normalizer(), StandardScaler()], "none": []}[norm]
    return make_pipeline(*steps, LogisticRegression(max_iter=3000, class_weight="balanced", random_state=seed))
def probe(F_tr, y_tr, F_te, y_te, norm, frac):
    out = []
    for seed in (0, 1, 2):
        idx = label_subset(y_tr, frac, seed)
        m = model(norm, seed).fit(F_tr[idx], y_tr[idx])
        out.append(balanced_accuracy_score(y_te, m.predict(F_te)))
        if frac == 1.0: break
    return round(float(np.mean(out)), 3), round(float(np.std(out)), 3)
s_tr, s_te = split_train_test(tr.labels, cfg.eval.test_fraction, tr.groups)
for fb in FBS:
    t0 = time.time()
    c = load_config(cfgname, [f"data.path={UNL}", f"model.feature_blocks={fb}"] + sys.argv[4:])
    if enc == "random":  # as a user builds it: the config's architecture, init code and seed
        c.eval.encoder = enc
        e = build_encoder(c, seed=c.train.seed)
    else:  # the exported weights read through `fb` blocks
        from sslmed.models import rebuild_backbone
        from safetensors.torch import load_file
        info = json.load(open(enc.replace(".safetensors", ".json")))
        info["kwargs"]["feature_blocks"] = fb
        e = rebuild_backbone(info); e.load_state_dict(load_file(enc)); e.eval()
    Ftr = extract_features(e, tr.crops[:, None], 64); Fte = extract_features(e, te.crops[:, None], 64)
    for norm in NORMS:
        row = {"label": label, "fb": fb, "norm": norm}
        for frac in (0.1, 1.0):
            row[f"cross{int(frac*100)}"] = probe(Ftr, tr.labels, Fte, te.labels, norm, frac)
            row[f"same{int(frac*100)}"] = probe(Ftr[s_tr], tr.labels[s_tr], Ftr[s_te], tr.labels[s_te], norm, frac)
        row["sec"] = round(time.time() - t0)
        print(json.dumps(row), flush=True)
        open("readout.jsonl", "a").write(json.dumps(row) + "\n")
