"""
Annotate the cells of an .h5ad file with a fine-tuned scBERT.

    python predict.py --ckpt=out/best.pt --input=my_cells.h5ad --output=predictions.csv
    python predict.py --ckpt=out/best.pt --input=my_cells.h5ad --output_h5ad=annotated.h5ad --embeddings=cells.npy
    python predict.py --ckpt=finetuned.pth --vocab=gene_panel.txt --label_names=celltypes.txt --input=...  # original
    python predict.py --ckpt=out/best.pt --input=my_cells.h5ad --importance=genes/   # which genes drive each type

The checkpoint is ours (train.py's best.pt or ckpt.pt, or quantize.py's int8 / ternary file, which carry their gene
vocabulary, label names and log base) or an original scBERT one, recognised by its keys; then `vocab` and
`label_names` must be given. Genes are matched to the checkpoint's vocabulary by symbol, and the overlap is reported.
Every cell is annotated, in file order: cells with fewer than min_genes expressed genes are flagged (column
scbert_qc_pass of output_h5ad), never dropped.

Novel types: a cell is called 'Unassigned' when its novelty score is above the threshold train.py calibrated on the
validation cells (novelty=auto: the checkpoint's default score, chosen by leave-one-type-out runs; see the README), or,
with novelty=scbert, scBERT's rule: its top probability is below unassigned_threshold. Checkpoints without calibrated
scores (the original's, older runs) use scBERT's rule; quantize.py refits them for the quantized model.

Gene importance (importance=<folder>): for every predicted type, the genes that receive the most attention (scBERT's
attention sum: ScBERT.attention_received) and the genes with the largest integrated gradients towards the type
(ScBERT.integrated_gradients; importance_steps=1 gives gradient × input), averaged over the type's cells:
top_genes.csv and a plot per type; and each cell's own top genes by both: cell_top_genes.csv.
"""
import os
import re
import shutil
import time

import h5py
import numpy as np
import torch

from data import (UserError, atomic_write, duplicated_ids_warning, load_checkpoint, model_input, process_h5ad,
                  read_gene_list, read_h5ad)
import metrics  # metrics.NOVELTY_SCORES (a module global here would read as a setting)
from metrics import novelty_scores, plot_top_genes
from model import ScBERT, model_name, pool, token_valid

# -----------------------------------------------------------------------------
ckpt = 'out/best.pt'           # our checkpoint from train.py, or an original scBERT checkpoint (.pth)
input = ''                     # the .h5ad file to annotate
output = 'predictions.csv'     # CSV: cell_id,predicted_label,probability,second_label,second_probability,novelty_score,
                               # top_label,top_probability (Unassigned: no probability; the top class is still there)
output_h5ad = ''               # also write a copy of the input with the predictions as new obs columns ('' = no)
embeddings = ''                # also save cell embeddings (n_cells x n_embd, the classifier's pooling) as .npy
                               # ('' = no)
novelty = 'auto'               # 'Unassigned' rule: 'auto' (the checkpoint's calibrated default score, else scBERT's) |
                               # 'scbert' (top probability < unassigned_threshold) | 'off' | a score with the
                               # checkpoint's threshold: maxprob | entropy | energy | mahalanobis | knn
unassigned_threshold = 0.5     # novelty=scbert: 'Unassigned' when the top probability is below this (scBERT's rule)
importance = ''                # a folder: write each predicted type's top genes (top_genes.csv, <type>.png) ('' = no)
importance_top = 50            # genes per type and method in top_genes.csv (0 = every gene)
importance_cell_top = 10       # genes per cell and method in cell_top_genes.csv (0 = no per-cell file)
importance_steps = 16          # integrated gradients' steps (1 = gradient × input: one backward pass instead of 16,
                               # but it misses saturated genes such as hormone genes at the top bin; see the README)
batch_size = 32                # cells per forward pass
layer = 'auto'                 # matrix to read: auto | X | raw | <layer name> (as prepare_data.py)
gene_key = ''                  # var column holding gene symbols ('' = the var index)
min_genes = 200                # cells with fewer expressed genes are flagged as failing QC (still annotated)
vocab = ''                     # original scBERT only: its gene panel, one symbol per line, in the checkpoint's order
label_names = ''               # original scBERT only: class names, one per line, in class-index order
label_key = ''                 # a check: obs column of the input's known cell types; the summary gives the agreement
                               # with them, with and without the Unassigned rule ('' = none)
device = 'auto'                # 'auto' | 'cpu' | 'cuda'
num_threads = 0                # CPU threads (0 = PyTorch's default)
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())

if not input:
    raise UserError('no input: set --input=<file.h5ad>')
if novelty not in ('auto', 'scbert', 'off', *metrics.NOVELTY_SCORES):
    raise UserError(f"novelty must be auto, scbert, off or one of {', '.join(metrics.NOVELTY_SCORES)}, not '{novelty}'")
if not importance and (importance_top, importance_cell_top, importance_steps) != (50, 10, 16):
    raise UserError('importance_top, importance_cell_top and importance_steps shape the --importance output: add '
                    '--importance=<folder>')
if importance_steps < 1:
    raise UserError(f'importance_steps must be at least 1 (1 = gradient × input), not {importance_steps}')
if importance_top < 0 or importance_cell_top < 0:
    raise UserError(f'importance_top and importance_cell_top must be >= 0, not {importance_top} and '
                    f'{importance_cell_top}')
if importance and os.path.exists(importance) and not os.path.isdir(importance):
    raise UserError(f'importance={importance} is a file; give a folder for top_genes.csv and the plots')
if not os.path.isfile(ckpt):
    raise UserError(f'checkpoint {ckpt} not found (set --ckpt=<train.py out_dir>/best.pt)')
for path in (output, output_h5ad, embeddings):                 # fail now, not after the whole inference
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UserError(f'the folder of {path} does not exist; create it or choose another path')
if device != 'auto' and 'cuda' in device and not torch.cuda.is_available():
    raise UserError(f"device '{device}' asked for, but CUDA is not available here (set --device=cpu or auto)")
if num_threads:
    torch.set_num_threads(num_threads)
torch.set_flush_denormal(True)
device = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
autocast = torch.autocast('cuda', dtype=torch.bfloat16) if 'cuda' in device else torch.autocast('cpu', enabled=False)


def load_ours(checkpoint):
    """Our checkpoint (quantize.py's int8 / packed ternary files included) -> (model, genes, classes, log_base)."""
    try:
        model = ScBERT.from_checkpoint(checkpoint)
        genes, classes, log_base = list(checkpoint['vocab']), list(checkpoint['label_names']), checkpoint['log_base']
    except (KeyError, TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise UserError(f'{ckpt} is damaged ({type(e).__name__}: {str(e)[:200]})') from None
    if vocab or label_names:
        print('note: vocab and label_names are taken from the checkpoint; the settings are only for original '
              'checkpoints')
    return model, genes, classes, log_base


def load_original(checkpoint):
    """The original release's checkpoint, with the vocab and label_names files -> (model, genes, classes, 2.0)."""
    try:
        model = ScBERT.from_scbert(checkpoint)
    except (ValueError, AttributeError, KeyError, RuntimeError) as e:
        raise UserError(f'{ckpt} is neither a nanoscBERT nor an original scBERT checkpoint ({e})') from None
    if model.cls_head is None:
        raise UserError(f'{ckpt} is a pretrained original scBERT without a classifier; fine-tune it first '
                        f'(train.py --init_from={ckpt})')
    if not (vocab and label_names):
        raise UserError(f'{ckpt} is an original scBERT checkpoint: also set --vocab=<gene panel file> and '
                        f'--label_names=<class names file> (one per line, in the checkpoint order)')
    genes, classes = read_gene_list(vocab), read_gene_list(label_names)
    if len(genes) != model.config.n_genes:
        raise UserError(f'{vocab} has {len(genes)} genes but {ckpt} was trained on {model.config.n_genes}; '
                        f'give the panel the checkpoint was trained with, in its order')
    if len(classes) != model.config.n_classes:
        raise UserError(f'{label_names} has {len(classes)} names but {ckpt} has {model.config.n_classes} classes')
    return model, genes, classes, 2.0    # scBERT used log2


def novelty_threshold(stats):
    """The novelty rule from the checkpoint's calibrated scores (or None) -> (rule, score name, threshold): a cell
    is novel when its score is above the threshold."""
    if stats and not (isinstance(stats, dict) and stats.get('default') in metrics.NOVELTY_SCORES
                      and set(metrics.NOVELTY_SCORES) <= set(stats.get('thresholds', {}))):
        raise UserError(f"{ckpt} is damaged (its 'novelty' entry is incomplete); use --novelty=scbert or fine-tune "
                        f"it again")
    rule = (stats['default'] if stats else 'scbert') if novelty == 'auto' else novelty
    if rule in metrics.NOVELTY_SCORES and not stats:
        raise UserError(f'{ckpt} has no calibrated novelty scores (made before they existed, or an original '
                        f'checkpoint): use --novelty=scbert, or fine-tune it again with train.py')
    if rule != 'scbert' and unassigned_threshold != 0.5:
        raise UserError(f"unassigned_threshold is scBERT's rule's; this run uses the rule '{rule}': add "
                        f"--novelty=scbert (or --novelty=off for no Unassigned calls)")
    if rule == 'scbert':     # top probability < t  <=>  maxprob = 1 - top probability > 1 - t
        return rule, 'maxprob', 1 - unassigned_threshold
    if rule == 'off':
        return rule, 'maxprob', float('inf')
    return rule, rule, stats['thresholds'][rule]


# the model, its gene vocabulary and its class names
checkpoint = load_checkpoint(ckpt)
ours = isinstance(checkpoint, dict) and 'model_args' in checkpoint
model, genes, classes, log_base = load_ours(checkpoint) if ours else load_original(checkpoint)
if model.cls_head is None:
    raise UserError(f'{ckpt} is a pretrained model without a classifier; fine-tune it first (train.py --mode=finetune '
                    f'--init_from={ckpt})')
model.to(device).eval()
stats = checkpoint.get('novelty') if isinstance(checkpoint, dict) else None
rule, score_name, threshold = novelty_threshold(stats)
if importance and getattr(model, 'quantization', None):
    raise UserError(f'{ckpt} is quantized ({model.quantization}): its int8 kernels have no gradient; run --importance '
                    f'with the float checkpoint it was made from')
attribution_name = 'gradient_x_input' if importance_steps == 1 else 'integrated_gradients'
expressed = model.config.input_genes == 'expressed'


class Importance:
    """Gene importance summed over the cells of each predicted type (Unassigned left out), per method; and each
    cell's own top genes."""

    def __init__(self):
        self.sums = {m: torch.zeros(len(classes), len(genes), dtype=torch.float64)
                     for m in ('attention', attribution_name)}
        self.n_per_type = torch.zeros(len(classes), dtype=torch.long)
        self.cell_top = {m: [] for m in self.sums}                    # per cell: its top genes, best first

    def add(self, x, logits, score):
        """Per token -> per gene, for a batch of cells x."""
        with autocast:
            attention = model.attention_received(x).float()                        # (B, L), each cell's sums to 1
            gradient, _ = model.integrated_gradients(x, steps=importance_steps)    # (B, L), predicted class
        top_class = logits.argmax(-1).cpu()
        kept = torch.from_numpy(score <= threshold)
        if expressed:   # token 1 + t is gene x['genes'][:, t] (-1 = padding); CLS left out
            gene_index, attention, gradient = x['genes'].cpu(), attention[:, 1:], gradient[:, 1:]
        else:           # panel position i is gene i; the appended last token is not a gene
            gene_index = torch.arange(len(genes)).expand(len(top_class), -1)
            attention, gradient = attention[:, :len(genes)], gradient[:, :len(genes)]
        for name, values in (('attention', attention), (attribution_name, gradient)):
            per_cell = torch.zeros(len(top_class), len(genes) + 1, dtype=torch.float64)   # + a slot for padding
            per_cell.scatter_add_(1, torch.where(gene_index >= 0, gene_index, len(genes)),
                                  values.detach().double().cpu())
            self.sums[name].index_add_(0, top_class[kept], per_cell[kept, :len(genes)])
            if importance_cell_top:         # the cell's own ranking; genes that score exactly 0 (not in the cell)
                ranked = per_cell[:, :len(genes)]                                   # are left out
                best = ranked.topk(min(importance_cell_top, len(genes)), dim=1)
                self.cell_top[name] += [';'.join(genes[g] for g, v in zip(i, val) if v != 0)
                                        for i, val in zip(best.indices.tolist(), best.values.tolist())]
        self.n_per_type += torch.bincount(top_class[kept], minlength=len(classes))


@torch.no_grad()
def annotate_batch(x, out, importances):
    """One batch of cells x (data.model_input's) -> appends its probabilities, novelty scores and embeddings."""
    with autocast:
        h = model.encode(x)                                        # (B, L, n_embd)
        features = model.cls_head.features(h, x)                   # (B, head_hidden)
        logits = model.cls_head.fc3(features)
    out['probs'].append(logits.float().softmax(-1).cpu().numpy())
    # the embedding scores (a search through up to 10,000 training cells) only when the rule reads them
    score = novelty_scores(logits.float(), features.float(),
                           stats if score_name in ('mahalanobis', 'knn') else None)[score_name]
    out['scores'].append(score)
    if embeddings:
        how = 'cls' if model.config.head == 'cls' else 'pooled'
        out['embeds'].append(pool(h.float(), token_valid(x), how).cpu().numpy())
    if importances:
        importances.add(x, logits, score)


def annotate(cells, importances):
    """Every cell of the file, in batches: the same input as train.py's evaluation (data.model_input: the panel
    binned, or the expressed genes' fixed subset per cell) -> dict of per-batch lists."""
    out = {'probs': [], 'embeds': [], 'qc_pass': [], 'scores': []}
    for chunk in cells:
        out['qc_pass'].append(chunk.passed_qc)
        for start in range(0, len(chunk.indptr) - 1, batch_size):
            ptr = chunk.indptr[start:start + batch_size + 1]
            csr = ptr - ptr[0], chunk.indices[ptr[0]:ptr[-1]], chunk.values[ptr[0]:ptr[-1]]
            x = model_input(csr, model.config, log_base)
            x = {k: v.to(device) for k, v in x.items()} if expressed else x.to(device)
            annotate_batch(x, out, importances)
    return out


# the cells, processed exactly as prepare_data.py does, aligned to the checkpoint's genes
cells = process_h5ad(input, layer=layer, gene_key=gene_key, log_base=log_base, vocab=genes, min_genes=min_genes)
known_labels = read_h5ad(input).obs_column(label_key) if label_key else None      # (a wrong key: stop now)
print(cells.summary())
duplicates = duplicated_ids_warning(cells.cell_ids, input, f"{output} still has one row per cell, in file order")
if duplicates:
    print(duplicates)
if cells.n_matched < 0.5 * len(genes):
    print(f'warning: only {cells.n_matched} of the model\'s {len(genes)} genes are in {input}; predictions may be poor')
importances = Importance() if importance else None
t0 = time.time()
outputs = annotate(cells, importances)
elapsed = time.time() - t0
prob, qc_pass, score = (np.concatenate(outputs[k]) for k in ('probs', 'qc_pass', 'scores'))

# top two classes per cell; 'Unassigned' when the novelty score is above the threshold
order = np.argsort(-prob, axis=1)
top, second = order[:, 0], order[:, 1] if prob.shape[1] > 1 else order[:, 0]
top_p, second_p = prob[np.arange(len(prob)), top], prob[np.arange(len(prob)), second]
names = np.array(classes, dtype=object)
predicted = np.where(score > threshold, 'Unassigned', names[top])
withheld = predicted == 'Unassigned'
probability = np.where(withheld, np.nan, top_p)                # of the predicted label: none for Unassigned


def agreement_line(known):
    """--label_key: how often the calls agree with the known types, with the Unassigned rule (a withheld cell counts
    as a disagreement), without it (the top class), and on the cells the rule kept."""
    known = np.array([str(v) if v is not None else '' for v in known], dtype=object)
    labelled = known != ''
    if not labelled.any():
        return f"note: obs '{label_key}' has no labels to check against"
    agree, agree_top = predicted == known, names[top] == known
    kept = labelled & ~withheld
    return (f"agreement with obs '{label_key}' ({int(labelled.sum())} labelled cells): {agree[labelled].mean():.3f} "
            f"with the Unassigned rule, {agree_top[labelled].mean():.3f} without it; "
            f"{agree[kept].mean() if kept.any() else float('nan'):.3f} on the {kept.sum() / labelled.sum():.1%} it "
            f"kept" + (f"; {int((labelled & ~np.isin(known, names)).sum())} cells of types the model does not know"
                       if (labelled & ~np.isin(known, names)).any() else ''))


def csv_field(s):
    s = str(s)
    return '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\n') else s


def write_predictions(path):
    with atomic_write(path) as tmp:
        with open(tmp, 'w') as f:
            f.write('cell_id,predicted_label,probability,second_label,second_probability,novelty_score,top_label,'
                    'top_probability\n')
            for row in zip(cells.cell_ids, predicted, probability, names[second], second_p, score, names[top], top_p):
                f.write(f'{csv_field(row[0])},{csv_field(row[1])},{"" if np.isnan(row[2]) else f"{row[2]:.6f}"},'
                        f'{csv_field(row[3])},{row[4]:.6f},{row[5]:.6g},{csv_field(row[6])},{row[7]:.6f}\n')


def add_obs_columns(path, columns):
    """Add columns {name: 1-d array} to obs of an .h5ad file in place, in the encoding the file already uses."""
    with h5py.File(path, 'r+') as f:
        obs = f['obs']
        if isinstance(obs, h5py.Dataset):               # legacy (< 0.7): obs is one structured array; rewrite it
            old = obs[()]
            encoded = {k: np.char.encode(v.astype(str), 'utf-8') for k, v in columns.items() if v.dtype == object}
            new_fields = [(k, encoded[k].dtype if k in encoded else v.dtype) for k, v in columns.items()]
            kept = [(name, old.dtype.fields[name][0]) for name in old.dtype.names if name not in columns]
            table = np.empty(len(old), dtype=kept + new_fields)
            for name, _ in kept:
                table[name] = old[name]
            for name, values in columns.items():
                table[name] = encoded.get(name, values)
            del f['obs']
            f['obs'] = table
            return
        order = [c.decode() if isinstance(c, bytes) else c for c in obs.attrs.get('column-order', [])]
        for name, values in columns.items():
            if name in obs:
                del obs[name]
            if values.dtype == object:
                obs.create_dataset(name, data=values.astype(str).astype(object), dtype=h5py.string_dtype())
                obs[name].attrs.update({'encoding-type': 'string-array', 'encoding-version': '0.2.0'})
            else:
                obs.create_dataset(name, data=values)
                obs[name].attrs.update({'encoding-type': 'array', 'encoding-version': '0.2.0'})
            if name not in order:
                order.append(name)
        obs.attrs['column-order'] = np.array(order, dtype=object) if order else np.array([], dtype='S1')


def write_importance(folder, imp):
    """Each type's mean over its cells, ranked (attention: a cell's shares, CLS / the appended token left out, so a
    little under 1 in all): top_genes.csv and a plot per type; and cell_top_genes.csv."""
    os.makedirs(folder, exist_ok=True)
    with atomic_write(os.path.join(folder, 'top_genes.csv')) as tmp, open(tmp, 'w') as f:
        f.write('cell_type,n_cells,method,rank,gene,score\n')
        for c in np.flatnonzero(imp.n_per_type.numpy()):
            ranked, n = {}, int(imp.n_per_type[c])
            for name, total in imp.sums.items():
                mean = (total[c] / imp.n_per_type[c]).numpy()
                order_c = np.argsort(-mean, kind='stable')[:importance_top or None]
                ranked[name] = [(genes[g], mean[g]) for g in order_c]
                for rank, (gene, value) in enumerate(ranked[name], 1):
                    f.write(f'{csv_field(classes[c])},{n},{name},{rank},{csv_field(gene)},{value:.6g}\n')
            plot_top_genes(ranked, os.path.join(folder, re.sub(r'[^A-Za-z0-9_.+-]', '_', classes[c]) + '.png'),
                           title=f'{classes[c]} ({n} cells)')
    if importance_cell_top:
        with atomic_write(os.path.join(folder, 'cell_top_genes.csv')) as tmp, open(tmp, 'w') as f:
            f.write(f'cell_id,predicted_label,attention,{attribution_name}\n')
            for row in zip(cells.cell_ids, predicted, imp.cell_top['attention'], imp.cell_top[attribution_name]):
                f.write(','.join(csv_field(v) for v in row) + '\n')


write_predictions(output)
if embeddings:
    with atomic_write(embeddings) as tmp:
        with open(tmp, 'wb') as f:
            np.save(f, np.concatenate(outputs['embeds']))
if output_h5ad:
    with atomic_write(output_h5ad) as tmp:
        shutil.copyfile(input, tmp)
        add_obs_columns(tmp, {'scbert_prediction': predicted.astype(object),
                              'scbert_probability': probability.astype(np.float32),
                              'scbert_top_label': names[top].astype(object),
                              'scbert_top_probability': top_p.astype(np.float32),
                              'scbert_second': names[second].astype(object),
                              'scbert_second_probability': second_p.astype(np.float32),
                              'scbert_novelty_score': score.astype(np.float32),
                              'scbert_qc_pass': qc_pass.astype(bool)})
if importance:
    write_importance(importance, importances)

n_unassigned, n_fail = int((predicted == 'Unassigned').sum()), int((~qc_pass).sum())
print(f'annotated {len(prob)} cells in {elapsed:.1f} s ({len(prob) / max(elapsed, 1e-9):.1f} cells/s) -> {output}'
      + (f', {output_h5ad}' if output_h5ad else '') + (f', {embeddings}' if embeddings else '')
      + (f', {importance}/top_genes.csv' + (', cell_top_genes.csv' if importance_cell_top else '')
         + ' and a plot per type' if importance else ''))
rule_text = {'scbert': f"scBERT's rule: top probability < {unassigned_threshold}", 'off': 'novelty=off'}.get(
    rule, f"{rule} score > {threshold:.4g}, the {stats['quantile'] if stats else 0:.0%} quantile of the validation "
          f"cells")
print(f'model: {model_name(model.config, quantization=checkpoint.get("quantization", "") if ours else "")} '
      f'from {ckpt}')
print(f'{n_unassigned} Unassigned ({n_unassigned / max(1, len(prob)):.1%} of the cells withheld; {rule_text}); '
      f'{n_fail} cells with fewer than {min_genes} expressed genes (flagged in scbert_qc_pass, still annotated)')
for name, count in zip(*np.unique(predicted, return_counts=True)):
    print(f'  {count:6d}  {name}')
if label_key:
    print(agreement_line(known_labels))
