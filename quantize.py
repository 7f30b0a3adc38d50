"""
Quantize a checkpoint for inference: int8, or BitNet b1.58's ternary weights packed at 1.6 bits, and score it.

    python quantize.py --ckpt=out/best.pt                       # int8 -> out/best_int8.pt, scored on its test fold
    python quantize.py --ckpt=out/best.pt --scheme=ternary      # post-training ternary (for comparison)
    python quantize.py --ckpt=out-qat/best.pt --scheme=ternary  # a bitlinear=True (QAT) model: packed as trained
    python quantize.py --ckpt='out-s2-baron1k/fold{fold}/best.pt' --fold=all --summary=results/q.json   # every CV fold

int8: every attention and feed-forward matrix (MoE experts included) becomes int8 with one absmax scale per output
row; at run time each token's activations are quantized with their own absmax scale, and on CPU the product runs in
PyTorch's int8 GEMM (lowbit.QuantLinear; its activation grid is 7-bit there, see QuantLinear). ternary: BitNet b1.58
(Ma et al. 2024): weights {-1, 0, +1} times one absmean scale per matrix, after an RMSNorm, activations quantized per
token. A model trained with train.py --bitlinear=True keeps exactly the ternary weights it trained with (on CPU the
kernel's activation grid differs a little from training's symmetric ±127); a float model gets BitLinear's norms added,
their gains calibrated on calibration_cells random training cells: post-training, for comparison with QAT. Embeddings,
norms, the router, FAVOR+'s features and the heads stay fp32. Ternary weights are stored five to a byte (base 3) and
unpacked exactly when the checkpoint loads: predict.py, bench.py and ScBERT.from_checkpoint run the file as it is.

A checkpoint with calibrated novelty scores (train.py's best.pt) gets them fitted again on the quantized model, whose
cell embeddings moved: the same training cells, and thresholds at the same quantile of the validation cells' scores.

The report: parameters quantized and kept in float, the quantized matrices' bytes against fp32, the file sizes, and
for a fine-tuned checkpoint of ours the test fold's accuracy and macro-F1 of the float model and of the quantized
one, and how often they agree. Speed is bench.py's: python bench.py --variants=out/best.pt,out/best_int8.pt
"""
import json
import os
from dataclasses import asdict

import numpy as np
import torch

from data import (Dataset, UserError, atomic_write, dataset_input, fold_split, leave_out_type, load_checkpoint,
                  read_gene_list)
from lowbit import packed_state_dict, quantize
from metrics import classification_metrics, novelty_rule
from model import ScBERT, as_bitlinear, calibrate_bitlinear

# -----------------------------------------------------------------------------
ckpt = 'out/best.pt'           # a checkpoint of ours (train.py's best.pt / ckpt.pt) or an original scBERT .pth
scheme = 'int8'                # 'int8' | 'ternary' (BitNet b1.58; post-training unless ckpt was trained with bitlinear)
out = ''                       # the quantized checkpoint ('' = beside ckpt: <name>_int8.pt / <name>_ternary.pt)
fold = ''                      # 'all': every fold, {fold} in ckpt and out replaced by 0..n_folds-1; a number: the
                               # checkpoint's test fold when it does not record one ('' = the checkpoint's own)
dataset = ''                   # prepared dataset to calibrate and score on ('' = the one the checkpoint trained on)
evaluate = True                # score the float and the quantized model on the checkpoint's test fold
calibration_cells = 256        # post-training ternary: training cells (a random sample) that set the norm gains
vocab = ''                     # original scBERT only: its gene panel, one symbol per line (stored for predict.py)
label_names = ''               # original scBERT only: its class names, one per line
batch_size = 64                # cells per forward pass when scoring
summary = ''                   # also write the results as JSON here ('' = no)
num_threads = 0                # CPU threads (0 = PyTorch's default)
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())

if scheme not in ('int8', 'ternary'):
    raise UserError(f"scheme must be int8 or ternary, not '{scheme}' (set --scheme=...)")
if fold and fold != 'all' and not fold.isdigit():
    raise UserError(f"fold must be a fold number or 'all', not '{fold}'")
if fold == 'all' and '{fold}' not in ckpt:
    raise UserError("fold='all' needs {fold} in the checkpoint path, e.g. --ckpt='out/fold{fold}/best.pt'")
if out and fold == 'all' and '{fold}' not in out:
    raise UserError("fold='all' writes one checkpoint per fold: put {fold} in --out, or leave it empty")
if calibration_cells < 1 or batch_size < 1:
    raise UserError('calibration_cells and batch_size must be at least 1')
for path in (summary, out):
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path.replace('{fold}', '0')))):
        raise UserError(f'the folder of {path} does not exist; create it or choose another path')
if num_threads:
    torch.set_num_threads(num_threads)
torch.set_flush_denormal(True)


def linear_bytes(model):
    """(fp32 bytes, stored bytes) of the matrices quantize() replaces: int8 is a byte per weight, packed ternary 1/5,
    plus the fp32 scales."""
    fp32 = stored = 0
    for m in model.quantized_linears():
        n = m.weight_int8.numel()
        fp32 += 4 * n
        stored += (-(-n // 5) if m.ternary else n) + 4 * m.weight_scale.numel()
    return fp32, stored


@torch.no_grad()
def outputs(model, data, idx):
    """-> (logits, the classifier's hidden features) of cells idx, as float32 tensors."""
    logits, features = [], []
    for start in range(0, len(idx), batch_size):
        x = dataset_input(data, idx[start:start + batch_size], model.config)
        f = model.cls_head.features(model.encode(x), x).float()
        logits.append(model.cls_head.fc3(f))
        features.append(f)
    return torch.cat(logits), torch.cat(features)


def predict(model, data, idx):
    return outputs(model, data, idx)[0].softmax(-1).numpy()


def refit_novelty(model, data, split, novelty):
    """The novelty statistics and thresholds of the quantized model, fitted as train.py fits the float model's: on
    the same training cells (the same seed), thresholds at the same quantile of the validation cells."""
    train_idx, val_idx = split[0], split[1]
    seed = int(novelty.get('seed', 0))
    n_fit = int(novelty.get('n_fit', len(train_idx)))
    fit_idx = train_idx if len(train_idx) <= n_fit else \
        np.sort(np.random.default_rng(seed).choice(train_idx, n_fit, replace=False))
    return novelty_rule(outputs(model, data, fit_idx)[1], data.labels[fit_idx], model.config.n_classes,
                        *outputs(model, data, val_idx), novelty['quantile'], novelty['default'], seed=seed,
                        k=novelty['k'], max_bank=len(novelty['bank']))


def load_float(path):
    """The float checkpoint at path -> (checkpoint, model, meta: what the quantized file keeps besides its weights).
    An original scBERT checkpoint gets its panel and classes from the vocab and label_names files."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise UserError(f'{path} holds a {type(checkpoint).__name__}, not a checkpoint')
    if checkpoint.get('quantization'):
        raise UserError(f"{path} is already quantized ({checkpoint['quantization']}); give the float checkpoint")
    try:
        model = ScBERT.from_checkpoint(checkpoint).eval()
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, AssertionError) as e:
        raise UserError(f'{path} is neither a usable nanoscBERT nor an original scBERT checkpoint '
                        f'({type(e).__name__}: {str(e)[:200]})') from None
    if model.config.bitlinear and scheme == 'int8':
        raise UserError(f'{path} was trained with bitlinear=True (ternary): use --scheme=ternary')
    meta = {key: checkpoint[key] for key in ('vocab', 'label_names', 'log_base', 'mode', 'fold', 'test_batch', 'config')
            if key in checkpoint}
    if 'test_batch' not in meta and meta.get('config', {}).get('test_batch'):    # an older ckpt.pt keeps it in config
        meta['test_batch'] = meta['config']['test_batch']
    if 'model_args' in checkpoint:
        return checkpoint, model, meta
    classifier = model.cls_head is not None                   # the original's: its panel and classes from files
    if not vocab or (classifier and not label_names):
        raise UserError(f'{path} is an original scBERT checkpoint: also set --vocab=<gene panel file>'
                        + (' and --label_names=<class names file>' if classifier else '')
                        + ' (one per line, in the checkpoint order), so the quantized file is self-contained')
    meta.update(vocab=read_gene_list(vocab), log_base=2.0, mode='finetune' if classifier else 'pretrain')
    if label_names:
        meta['label_names'] = read_gene_list(label_names)
    if len(meta['vocab']) != model.config.n_genes:
        raise UserError(f'{vocab} has {len(meta["vocab"])} genes but {path} was trained on {model.config.n_genes}')
    if classifier and len(meta['label_names']) != model.config.n_classes:
        raise UserError(f'{label_names} has {len(meta["label_names"])} names but {path} has '
                        f'{model.config.n_classes} classes')
    return checkpoint, model, meta


def dataset_of(path, checkpoint, meta, classifier):
    """The prepared dataset the checkpoint trained on (or --dataset), checked against its genes and cell types, with
    a train.py --holdout run's labels -> (Dataset, its path)."""
    data_path = dataset or meta.get('config', {}).get('dataset', '')
    data = Dataset(data_path)
    if data.vocab != list(meta.get('vocab', data.vocab)):
        raise UserError(f'{data_path} has other genes than {path}; give the dataset it was trained on (--dataset)')
    held_out = checkpoint.get('holdout', '') if 'model_args' in checkpoint else ''
    if held_out and held_out not in data.label_names:
        raise UserError(f"{path} left out '{held_out}', which {data_path} does not have; give its dataset (--dataset)")
    if held_out:                                           # a train.py --holdout run: its labels, without the type
        data.labels, data.label_names, _ = leave_out_type(data.labels, data.label_names, held_out)
    if classifier and list(meta.get('label_names') or data.label_names) != data.label_names:
        raise UserError(f'{data_path} has other cell types than {path}; give the dataset it was trained on '
                        f'(--dataset)')
    return data, bool(held_out)


def scoring_data(path, checkpoint, model, meta, k, needs_calibration):
    """The data quantization needs: -> (Dataset or None, (train, val, test) indices of test fold k or None, k, the
    novelty statistics to refit or None). Calibration needs the training cells; the novelty refit and the scores
    need the dataset and the fold; without them the quantized model is written unscored."""
    data_path = dataset or meta.get('config', {}).get('dataset', '')
    if k is not None and meta.get('fold') is not None and int(meta['fold']) != k:
        raise UserError(f"{path} was trained with test fold {meta['fold']}, not {k}: its test cells would be wrong")
    k = k if k is not None else meta.get('fold')
    classifier = model.cls_head is not None
    novelty = checkpoint.get('novelty') if 'model_args' in checkpoint else None
    if novelty and not needs_calibration and not evaluate and not os.path.isfile(os.path.join(data_path, 'meta.json')):
        novelty = None                                         # only the refit wanted the data: keep the float model's
    if not (needs_calibration or novelty or (evaluate and classifier)):
        return None, None, k, novelty
    if not data_path:
        if needs_calibration:
            raise UserError(f'{path} does not say which dataset it trained on: set --dataset=<prepared dataset>')
        print(f'note: {path} does not say which dataset it trained on, so it is not scored: set --dataset=... to '
              f'score it')
        return None, None, k, novelty
    data, held_out = dataset_of(path, checkpoint, meta, classifier)
    if k is not None:
        return data, fold_split(data, int(k), meta.get('test_batch', ''), labelled_only=held_out), k, novelty
    if needs_calibration:
        raise UserError(f'{path} does not record its test fold, whose cells calibration must not see: set --fold=N')
    print(f'note: {path} does not record its test fold, so it is not scored: set --fold=N to score it')
    return data, None, k, novelty


def score(report, model, data, split, float_prob, out_path):
    """The test fold's accuracy and F1 of the float model and of the quantized one (read back from its file)."""
    test_idx, y = split[2], data.labels[split[2]]
    quant_prob = predict(ScBERT.from_checkpoint(load_checkpoint(out_path)).eval(), data, test_idx)
    report['float'] = classification_metrics(y, float_prob.argmax(1), float_prob, data.label_names)
    report['quantized'] = classification_metrics(y, quant_prob.argmax(1), quant_prob, data.label_names)
    report['agreement'] = float((float_prob.argmax(1) == quant_prob.argmax(1)).mean())
    for who in ('float', 'quantized'):
        report[who] = {m: report[who][m] for m in ('accuracy', 'macro_f1', 'weighted_f1')}


def quantize_one(path, k, out_path):
    """Quantize the checkpoint at path (test fold k, or None) into out_path; returns the report dict."""
    checkpoint, model, meta = load_float(path)
    qat = model.config.bitlinear
    needs_calibration = scheme == 'ternary' and not qat
    data, split, k, novelty = scoring_data(path, checkpoint, model, meta, k, needs_calibration)
    report = {'ckpt': path, 'out': out_path, 'scheme': scheme, 'fold': k,
              'method': 'QAT (bitlinear=True)' if qat else 'post-training'}
    scored = data is not None and split is not None and evaluate and model.cls_head is not None
    float_prob = predict(model, data, split[2]) if scored else None
    if needs_calibration:
        model = as_bitlinear(model)
        cells = np.sort(np.random.default_rng(0).choice(split[0], min(calibration_cells, len(split[0])), replace=False))
        calibrate_bitlinear(model, (dataset_input(data, cells[i:i + batch_size], model.config)
                                    for i in range(0, len(cells), batch_size)))
        report['calibration_cells'] = len(cells)
    quantize(model, scheme)
    if novelty and split is not None:
        meta['novelty'] = refit_novelty(model.eval(), data, split, novelty)
        report['novelty'] = 'refitted on the quantized model'
    elif 'model_args' in checkpoint and checkpoint.get('novelty'):
        meta['novelty'] = checkpoint['novelty']
        report['novelty'] = "kept from the float model (no dataset or test fold here to refit them on)"
        print(f"note: {path}'s novelty thresholds are kept from the float model; give --dataset (and --fold) to "
              f"refit them")
    n_quantized = sum(m.weight_int8.numel() for m in model.quantized_linears())
    fp32_bytes, stored_bytes = linear_bytes(model)
    report.update(params=model.num_params(), params_quantized=n_quantized,
                  params_float=model.num_params() - n_quantized,
                  linear_bytes_fp32=fp32_bytes, linear_bytes=stored_bytes, linear_ratio=fp32_bytes / stored_bytes)
    with atomic_write(out_path) as tmp:
        torch.save(dict(meta, model=packed_state_dict(model), model_args=asdict(model.config), quantization=scheme,
                        source=path), tmp)
    report.update(file_bytes_float=os.path.getsize(path), file_bytes=os.path.getsize(out_path))
    if scored:
        score(report, model, data, split, float_prob, out_path)
    return report


def default_out(path):
    stem, ext = os.path.splitext(path)
    return f'{stem}_{scheme}{ext or ".pt"}'


if fold == 'all':
    first = ckpt.replace('{fold}', '0')
    n_folds = len([k for k in range(100) if os.path.isfile(ckpt.replace('{fold}', str(k)))])
    if not n_folds:
        raise UserError(f'checkpoint {first} not found (set --ckpt=<out_dir>/fold{{fold}}/best.pt)')
    jobs = [(ckpt.replace('{fold}', str(k)), k, (out or default_out(ckpt)).replace('{fold}', str(k)))
            for k in range(n_folds)]
else:
    path = ckpt.replace('{fold}', fold) if fold else ckpt            # --fold=N picks one fold of a CV run
    jobs = [(path, int(fold) if fold else None, (out or default_out(path)).replace('{fold}', fold or '{fold}'))]
for path, _, out_path in jobs:
    if os.path.abspath(out_path) == os.path.abspath(path):
        raise UserError(f'--out would overwrite the float checkpoint {path}: choose another path')

reports = []
for path, k, out_path in jobs:
    r = quantize_one(path, k, out_path)
    reports.append(r)
    line = (f"{path} -> {out_path} ({scheme}, {r['method']}): {r['params_quantized'] / 1e6:.2f}M parameters quantized, "
            f"{r['params_float'] / 1e6:.2f}M kept in float; quantized matrices "
            f"{r['linear_bytes_fp32'] / 1e6:.2f} MB fp32 "
            f"-> {r['linear_bytes'] / 1e6:.3f} MB ({r['linear_ratio']:.1f}x smaller); file "
            f"{r['file_bytes_float'] / 1e6:.2f} -> {r['file_bytes'] / 1e6:.2f} MB")
    print(line + (f"; novelty scores {r['novelty']}" if 'novelty' in r else ''))
    if 'quantized' in r:
        f, q = r['float'], r['quantized']
        print(f"  test fold {r['fold']}: float accuracy {f['accuracy']:.3f} macro-F1 {f['macro_f1']:.3f}  |  "
              f"{scheme} accuracy {q['accuracy']:.3f} macro-F1 {q['macro_f1']:.3f}  |  same prediction on "
              f"{r['agreement']:.1%} of cells")

scored = [r for r in reports if 'quantized' in r]
if len(scored) > 1:
    def stat(who, m):
        v = [r[who][m] for r in scored]
        return float(np.mean(v)), float(np.std(v, ddof=1))
    for who in ('float', 'quantized'):
        (am, asd), (fm, fsd) = stat(who, 'accuracy'), stat(who, 'macro_f1')
        print(f"{len(scored)}-fold  {who if who == 'float' else scheme:9s} accuracy {am:.3f} ± {asd:.3f}   "
              f"macro-F1 {fm:.3f} ± {fsd:.3f}")
    drop = [r['float']['macro_f1'] - r['quantized']['macro_f1'] for r in scored]
    print(f"macro-F1 drop (float - {scheme}): {np.mean(drop) * 100:.2f} ± {np.std(drop, ddof=1) * 100:.2f} points; "
          f"agreement {min(r['agreement'] for r in scored):.1%}-{max(r['agreement'] for r in scored):.1%}")
if summary:
    with atomic_write(summary) as tmp, open(tmp, 'w') as f:
        json.dump({'settings': config, 'folds': reports}, f, indent=1)
    print(f'wrote {summary}')
