"""Masking strategies for pretraining (data.py's masking section, train.py's masking=): each strategy's candidates and
counts on constructed cells, for scBERT's panel and for scBERT 2.0's expressed input; scBERT's panel masking kept
bit for bit; pathway masks exactly whole chosen gene sets; multiscale uses every scale, its regions runs of one
chromosome; the dynamic rate; determinism; the user errors; and train.py end to end (dynamic resumes bit for bit,
pathway and multiscale pretrain on the annotated Baron fixture). Synthetic annotations only, except end to end."""
import math
import re
import shutil

import numpy as np
import pytest
import torch

import data
from data import UserError
from model import ModelConfig
from conftest import SHARED, state, user_error
from conftest import run_script as run

N_GENES = 60


def synthetic_annotation(seed=0, n_genes=N_GENES, with_sets=True):
    """Genes 0-49 on chr1-chr3 at shuffled positions, 50-59 without coordinates; 10 gene sets over genes 0-54 (55-59
    are in none), one of them huge (45 genes). The dict Dataset.annotation() returns."""
    rng = np.random.default_rng(seed)
    chrom, start = np.zeros(n_genes, np.int64), np.full(n_genes, -1, np.int64)
    chrom[:50] = rng.integers(1, 4, 50)
    start[:50] = rng.permutation(50) * 1000 + 1
    sizes = (3, 4, 5, 6, 8, 10, 12, 3, 4, 45) if with_sets else ()
    sets = [np.sort(rng.choice(55, size, replace=False)) for size in sizes]
    sets_of = [[s for s, members in enumerate(sets) if g in members] for g in range(n_genes)]
    ptr = np.concatenate([[0], np.cumsum([len(s) for s in sets_of])]).astype(np.int64)
    idx = np.array([s for row in sets_of for s in row], np.int64)
    return {'chrom': chrom, 'chrom_names': ['chr1', 'chr2', 'chr3'], 'start': start,
            'end': np.where(start > 0, start + 500, -1), 'pathway_ptr': ptr, 'pathway_idx': idx,
            'pathway_names': [f'set{i}' for i in range(len(sets))]}, [set(s.tolist()) for s in sets]


def genomic_region(annotation, gene, size):
    """The region starting at `gene`, computed independently: the next `size` genes with coordinates by (chromosome,
    start), on the gene's chromosome."""
    placed = [g for g in range(len(annotation['chrom'])) if annotation['chrom'][g] > 0]
    placed.sort(key=lambda g: (annotation['chrom'][g], annotation['start'][g], g))
    i = placed.index(gene)
    return [g for g in placed[i:i + size] if annotation['chrom'][g] == annotation['chrom'][gene]]


def random_cell(seed, length=40, expressed=0.7):
    rng = np.random.default_rng(seed)
    return rng.choice(N_GENES, length, replace=False), rng.random(length) < expressed


# ------------------------------------------------------------------------------------------ counts and candidates

def test_random_masks_zeros_too_and_nonzero_never():
    zeros_masked = 0
    for seed in range(50):
        genes, nonzero = random_cell(seed)
        for masking in ('random', 'nonzero', 'dynamic'):
            pos, units = data.choose_masked(np.random.default_rng(seed), nonzero, 0.3, masking, genes)
            assert len(set(pos.tolist())) == len(pos) and units == []
            if masking == 'random':
                assert len(pos) == math.ceil(0.3 * len(nonzero))
                zeros_masked += int((~nonzero[pos]).sum())
            else:
                assert len(pos) == math.ceil(0.3 * nonzero.sum()) and nonzero[pos].all()
    assert zeros_masked > 0
    # ceil without float round-off: 0.15 x 20 is 3 (float64 says 3.0000000000000004)
    assert len(data.choose_masked(np.random.default_rng(0), np.ones(20, bool), 0.15)[0]) == 3


def test_expressed_input_each_strategy_masks_its_candidates():
    """mask_expressed on an expressed batch with n_zero_genes: only random ever masks the zero genes; every strategy
    targets the true bins and replaces with the mask (value 0) with probability replace_prob."""
    cfg = ModelConfig(n_genes=N_GENES, n_bins=5, n_embd=16, n_layer=1, n_head=2, dim_head=8, input_genes='expressed',
                      attention='sdpa', head='cls', value_emb='bins', n_zero_genes=6)
    units = data.gene_units(synthetic_annotation()[0], N_GENES, region_genes=4)
    rng = np.random.default_rng(3)
    lengths = [5, 30, 12, 44]
    indices = [np.sort(rng.choice(N_GENES, n, replace=False)) for n in lengths]
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices, values = np.concatenate(indices).astype(np.int32), rng.exponential(2, sum(lengths)).astype(np.float32) + .1
    plain = data.expressed_batch(indptr, indices, values, data.cell_seeds(indptr, indices), cfg, 2.0)
    zeros_masked = {}
    for masking in data.MASKING:
        for replace_prob in (1.0, 0.0):
            out = data.mask_expressed(plain, [[7, i] for i in range(4)], cfg.mask_id, 0.3, replace_prob, masking, units)
            chosen = out['target_bins'] != -100
            real, expressed = plain['genes'] >= 0, plain['values'] > 0
            assert not chosen[~real].any() and torch.equal(out['target_bins'][chosen], plain['bins'][chosen])
            assert torch.equal(out['target_values'], plain['values'])
            replaced = out['bins'] == cfg.mask_id
            assert torch.equal(replaced, chosen if replace_prob == 1.0 else torch.zeros_like(chosen))
            assert (out['values'][replaced] == 0).all()
            assert torch.equal(out['values'][~replaced], plain['values'][~replaced])
            zeros_masked[masking] = int((chosen & real & ~expressed).sum())
            for i in range(4):
                n_real, n_expressed = int(real[i].sum()), int(expressed[i].sum())
                if masking == 'random':
                    assert chosen[i].sum() == math.ceil(0.3 * n_real)
                elif masking in ('nonzero', 'dynamic', 'multiscale'):
                    assert chosen[i].sum() == math.ceil(0.3 * n_expressed)
    assert zeros_masked['random'] > 0
    assert all(zeros_masked[m] == 0 for m in ('nonzero', 'dynamic', 'pathway', 'multiscale'))


def original_panel_masking(tokens, idx, step, seed, mask_prob, replace_prob, mask_id):
    """train.py's get_batch before the masking strategies, verbatim: scBERT's mask_tokens, one generator per cell."""
    masked = []
    for cell, row in zip(idx, tokens):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 0 if step is None else step + 1, int(cell)])
                                              .generate_state(1)[0]))
        masked.append(data.mask_tokens(row[None], mask_prob, replace_prob, mask_id=mask_id, generator=g))
    return tuple(torch.cat(t) for t in zip(*masked))


@pytest.mark.parametrize('step', [None, 0, 17])
def test_panel_nonzero_is_the_original_masking_bit_for_bit(step):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 6, (9, 301), generator=g) * (torch.rand(9, 301, generator=g) < 0.4)
    tokens[:, -1] = 0                                                      # scBERT's appended token
    idx = np.array([3, 8, 1, 77, 5, 0, 12, 40, 2])
    seeds = [[1337, 0 if step is None else step + 1, int(c)] for c in idx]
    want = original_panel_masking(tokens, idx, step, 1337, 0.15, 0.9, 6)
    for masking in ('nonzero', 'dynamic'):                                 # dynamic: nonzero at its rate
        got = data.mask_panel(tokens, seeds, 6, 0.15, 0.9, masking)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    other_rate = original_panel_masking(tokens, idx, step, 1337, 0.3, 0.9, 6)
    got = data.mask_panel(tokens, seeds, 6, 0.3, 0.9, 'dynamic')
    assert torch.equal(got[0], other_rate[0]) and torch.equal(got[1], other_rate[1])


def test_panel_random_pathway_multiscale():
    units = data.gene_units(synthetic_annotation()[0], N_GENES, region_genes=4)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(1, 6, (20, N_GENES + 1), generator=g) * (torch.rand(20, N_GENES + 1, generator=g) < 0.5)
    tokens[:, -1] = 0
    seeds = [[5, 1, i] for i in range(20)]
    for masking in ('random', 'pathway', 'multiscale'):
        masked, labels = data.mask_panel(tokens, seeds, 6, 0.25, 1.0, masking, units)
        chosen = labels != -100
        assert not chosen[:, -1].any() and torch.equal(labels[chosen], tokens[chosen])
        assert torch.equal(masked == 6, chosen) and torch.equal(masked[~chosen], tokens[~chosen])
        n_nonzero = (tokens[:, :-1] != 0).sum(1)
        if masking == 'random':                                            # any of the n_genes tokens, zeros too
            assert (chosen.sum(1) == math.ceil(0.25 * N_GENES)).all() and (tokens[chosen] == 0).any()
        else:
            assert (tokens[chosen] != 0).all()
        if masking == 'multiscale':
            assert torch.equal(chosen.sum(1), torch.ceil(n_nonzero * 0.25 - 1e-9).long())


# ------------------------------------------------------------------------------------------------ pathway masking

def replay_pathway(genes, nonzero, mask_prob, units, sets, seed):
    """choose_masked('pathway') on one cell, checked against the documented rule. Returns its chosen sets."""
    pos, chosen = data.choose_masked(np.random.default_rng(seed), nonzero, mask_prob, 'pathway', genes, units)
    candidates = {int(genes[p]) for p in np.flatnonzero(nonzero)}
    chosen_sets = [s for scale, s in chosen]
    assert all(scale == 'pathway' for scale, _ in chosen)
    # exactly the union of the chosen sets, intersected with the cell's expressed genes
    assert {int(genes[p]) for p in pos} == {g for s in chosen_sets for g in sets[s]} & candidates
    assert len(set(pos.tolist())) == len(pos) and nonzero[pos].all()
    # the stopping rule: each set masks new genes within the budget left, but the last may overshoot by less than
    # the budget left before it; unmasked sets then have no new gene or more than the budget left
    target, masked = math.ceil(mask_prob * len(candidates)), set()
    for k, s in enumerate(chosen_sets):
        new = (sets[s] & candidates) - masked
        left = target - len(masked)
        assert 0 < len(new) and (len(new) <= left or (k == len(chosen_sets) - 1 and len(new) < 2 * left))
        masked |= new
    left = target - len(masked)
    if left > 0:
        news = [len((sets[s] & candidates) - masked) for s in range(len(sets)) if s not in chosen_sets]
        assert all(n == 0 or n >= 2 * left for n in news)
    return chosen_sets, target


def test_pathway_masks_exactly_the_chosen_sets():
    annotation, sets = synthetic_annotation()
    units = data.gene_units(annotation, N_GENES)
    used, huge = set(), 9
    for seed in range(300):
        genes, nonzero = random_cell(seed, length=int(20 + seed % 40))
        chosen, target = replay_pathway(genes, nonzero, 0.2, units, sets, seed)
        used.update(chosen)
        expressed_in_huge = len(sets[huge] & {int(g) for g in genes[nonzero]})
        if expressed_in_huge >= 2 * target:                               # one huge set never masks the whole cell
            assert huge not in chosen
        assert not {int(g) for g in genes[data.choose_masked(np.random.default_rng(seed), nonzero, 0.2, 'pathway',
                                                             genes, units)[0]]} & set(range(55, 60))   # in no set
    assert used >= set(range(9))                                           # every ordinary set gets its turn


def test_pathway_budget_with_singleton_sets_is_exact():
    """Disjoint one-gene sets: pathway masking is then nonzero's count, ceil(mask_prob x n)."""
    annotation = {'chrom': np.zeros(N_GENES, np.int64), 'chrom_names': [], 'start': np.full(N_GENES, -1),
                  'end': np.full(N_GENES, -1), 'pathway_ptr': np.arange(N_GENES + 1), 'pathway_idx': np.arange(N_GENES),
                  'pathway_names': [str(g) for g in range(N_GENES)]}
    units = data.gene_units(annotation, N_GENES)
    for seed in range(30):
        genes, nonzero = random_cell(seed)
        pos, chosen = data.choose_masked(np.random.default_rng(seed), nonzero, 0.15, 'pathway', genes, units)
        assert len(pos) == len(chosen) == math.ceil(0.15 * nonzero.sum()) and nonzero[pos].all()
        assert sorted(s for _, s in chosen) == sorted(genes[pos].tolist())


# --------------------------------------------------------------------------------------------- multiscale masking

def test_gene_units_genomic_order_and_regions():
    annotation, sets = synthetic_annotation()
    units = data.gene_units(annotation, N_GENES, region_genes=5)
    assert units.n_sets == 10 and (units.rank[50:] == -1).all() and len(units.order) == 50
    for g in range(50):
        r = units.rank[g]
        assert units.order[r] == g
        assert units.order[r:units.region_end[r]].tolist() == genomic_region(annotation, g, 5)
    for s in range(10):
        assert set(units.set_genes[units.set_ptr[s]:units.set_ptr[s + 1]].tolist()) == sets[s]


def test_multiscale_uses_every_scale_and_regions_are_runs_of_one_chromosome():
    annotation, sets = synthetic_annotation()
    units = data.gene_units(annotation, N_GENES, region_genes=4)
    scales = set()
    for seed in range(100):
        genes, nonzero = random_cell(seed)
        pos, chosen = data.choose_masked(np.random.default_rng(seed), nonzero, 0.3, 'multiscale', genes, units)
        assert len(pos) == math.ceil(0.3 * nonzero.sum()) and nonzero[pos].all()   # single genes always fit
        masked, candidates = {int(g) for g in genes[pos]}, {int(g) for g in genes[nonzero]}
        covered = set()
        for scale, unit in chosen:
            scales.add(scale)
            if scale == 'gene':
                covered.add(unit)
            elif scale == 'pathway':
                covered |= sets[unit] & candidates
            else:
                region = genomic_region(annotation, unit, 4)
                assert len({annotation['chrom'][g] for g in region}) == 1 and unit in masked
                covered |= set(region) & candidates
        assert masked <= covered
    assert scales == {'gene', 'pathway', 'region'}
    # regions alone: masked genes are expressed genes of the chosen regions, consecutive on one chromosome, in order
    for seed in range(100):
        genes, nonzero = random_cell(seed)
        pos, chosen = data.choose_masked(np.random.default_rng(seed), nonzero, 0.3, 'multiscale', genes, units,
                                         (0, 0, 1))
        assert {s for s, _ in chosen} <= {'region'} and not set(genes[pos].tolist()) & set(range(50, 60))
        masked, candidates = set(genes[pos].tolist()), set(genes[nonzero].tolist())
        assert masked <= {g for _, u in chosen for g in genomic_region(annotation, u, 4)} & candidates
    # one scale at a time; scales the data lack are skipped
    genes, nonzero = random_cell(1)
    for weights, only in (((1, 0, 0), 'gene'), ((0, 1, 0), 'pathway')):
        _, chosen = data.choose_masked(np.random.default_rng(1), nonzero, 0.3, 'multiscale', genes, units, weights)
        assert chosen and {s for s, _ in chosen} == {only}
    no_sets = data.gene_units(synthetic_annotation(with_sets=False)[0], N_GENES, region_genes=4)
    genes, nonzero = random_cell(2)
    pos, chosen = data.choose_masked(np.random.default_rng(2), nonzero, 0.3, 'multiscale', genes, no_sets)
    assert len(pos) == math.ceil(0.3 * nonzero.sum()) and 'pathway' not in {s for s, _ in chosen}
    pos, chosen = data.choose_masked(np.random.default_rng(2), nonzero, 0.3, 'multiscale', genes, no_sets, (0, 1, 0))
    assert len(pos) == 0 and chosen == []


# ------------------------------------------------------------------------------------- dynamic rate, determinism

def test_dynamic_rate_starts_at_max_falls_with_accuracy_and_is_clipped():
    assert data.dynamic_mask_rate(0.0) == pytest.approx(0.3)                 # the EMA starts at 0
    rates = [data.dynamic_mask_rate(acc, 0.1, 0.3) for acc in np.linspace(0, 1, 21)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert rates[-1] == pytest.approx(0.1) and rates[10] == pytest.approx(0.2)
    assert data.dynamic_mask_rate(1.5) == pytest.approx(0.1) and data.dynamic_mask_rate(-0.5) == pytest.approx(0.3)
    assert data.dynamic_mask_rate(0.5, 0.05, 0.45) == pytest.approx(0.25)


@pytest.mark.parametrize('masking', data.MASKING)
def test_same_seeds_same_masks(masking):
    units = data.gene_units(synthetic_annotation()[0], N_GENES, region_genes=4)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, 6, (6, N_GENES + 1), generator=g) * (torch.rand(6, N_GENES + 1, generator=g) < 0.6)
    tokens[:, -1] = 0
    seeds = [[9, 4, i] for i in range(6)]
    a, b = (data.mask_panel(tokens, seeds, 6, 0.3, 0.9, masking, units) for _ in range(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = data.mask_panel(tokens, [[9, 5, i] for i in range(6)], 6, 0.3, 0.9, masking, units)
    assert not torch.equal(a[1], c[1])                                     # another step, other masks
    genes, nonzero = random_cell(4)
    x, y = (data.choose_masked(np.random.default_rng([1, 2]), nonzero, 0.3, masking, genes, units) for _ in range(2))
    assert np.array_equal(x[0], y[0]) and x[1] == y[1]


def test_user_errors():
    genes, nonzero = random_cell(0)
    with pytest.raises(UserError, match='masking must be one of'):
        data.choose_masked(np.random.default_rng(0), nonzero, 0.3, 'span', genes)
    for masking in ('pathway', 'multiscale'):
        with pytest.raises(UserError, match='--annotate'):
            data.choose_masked(np.random.default_rng(0), nonzero, 0.3, masking, genes)
    assert data.parse_multiscale_weights('1,2,0.5') == (1.0, 2.0, 0.5)
    for bad in ('1,1', '1,x,1', '0,0,0', '1,-1,1', 'nan,1,1'):
        with pytest.raises(UserError, match='multiscale_weights'):
            data.parse_multiscale_weights(bad)


# ------------------------------------------------------------------------------------------------ train.py, end to end

TINY = ['--n_embd=16', '--n_layer=1', '--n_head=2', '--dim_head=8', '--head_hidden=16', '--num_threads=1',
        '--batch_size=8', '--mode=pretrain']
V2 = ['--input_genes=expressed', '--attention=sdpa', '--head=cls', '--n_head=4', '--dim_head=4', '--norm=rmsnorm',
      '--mlp=swiglu', '--value_emb=continuous', '--n_bins=7', '--max_genes=96', '--n_zero_genes=8']


def test_dynamic_masking_rate_falls_and_resumes_bit_for_bit(baron, tmp_path):
    args = [f'--dataset={baron}', *TINY, '--masking=dynamic', '--max_iters=24', '--eval_interval=8', '--log_interval=1',
            '--learning_rate=3e-3', '--warmup_iters=2', '--dropout=0.1']
    result = run('train.py', f'--out_dir={tmp_path / "a"}', *args)
    history = state(tmp_path / 'a' / 'ckpt.pt')['history']
    rates, ema = history['mask_rate'], history['mask_acc_ema']         # each step's rate, the EMA after that step
    assert len(rates) == 24 and rates[0] == pytest.approx(0.3)
    for k in range(1, 24):                                              # the documented rule, step by step
        assert rates[k] == pytest.approx(data.dynamic_mask_rate(ema[k - 1], 0.1, 0.3))
    assert ema[-1] > ema[0] > 0 and rates[-1] < rates[0]                # accuracy grew, the rate fell
    assert np.all(np.diff(rates[:8]) < 0) and np.all(np.diff(ema[:8]) > 0)
    logged = [(float(r), float(e)) for r, e in re.findall(r'mask rate (\d\.\d+) \(masked-bin accuracy EMA (\d\.\d+)\)',
                                                          result.stdout)]
    assert len(logged) == 24 and logged[-1][0] == pytest.approx(rates[-1], abs=1e-3)
    # killed between checkpoints and resumed: the same weights, bit for bit, and the same rates
    run('train.py', f'--out_dir={tmp_path / "b"}', *args, '--stop_iter=13')
    assert state(tmp_path / 'b' / 'ckpt.pt')['mask_acc_ema'] == pytest.approx(ema[8], abs=0)
    run('train.py', f'--out_dir={tmp_path / "b"}', *args, '--init_from=resume')
    a, b = state(tmp_path / 'a' / 'ckpt.pt'), state(tmp_path / 'b' / 'ckpt.pt')
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert a['mask_acc_ema'] == b['mask_acc_ema'] and a['history']['mask_rate'] == b['history']['mask_rate']
    # background workers cannot know the live rate: they build the batches unmasked, the training process masks
    run('train.py', f'--out_dir={tmp_path / "c"}', *args, '--num_workers=2', '--max_iters=6')
    run('train.py', f'--out_dir={tmp_path / "d"}', *args, '--max_iters=6')
    c, d = state(tmp_path / 'c' / 'ckpt.pt'), state(tmp_path / 'd' / 'ckpt.pt')
    assert c['history']['mask_rate'] == d['history']['mask_rate']
    for k in c['model']:
        assert torch.equal(c['model'][k], d['model'][k]), k


@pytest.mark.parametrize('inputs', ['panel', 'expressed'])
def test_dynamic_validation_masks_as_nonzero_at_mask_prob(baron, tmp_path, inputs):
    """With the learning rate at 0 the model stays at its initialisation: dynamic's validation (rate 0.3 in training)
    then scores exactly what nonzero's does, both masking at mask_prob."""
    args = [f'--dataset={baron}', *TINY, '--max_iters=1', '--eval_interval=1', '--learning_rate=0', '--min_lr=0',
            *(V2 if inputs == 'expressed' else [])]
    run('train.py', f'--out_dir={tmp_path / "n"}', *args, '--masking=nonzero')
    run('train.py', f'--out_dir={tmp_path / "d"}', *args, '--masking=dynamic')
    n, d = state(tmp_path / 'n' / 'ckpt.pt')['history'], state(tmp_path / 'd' / 'ckpt.pt')['history']
    assert n['val_masked_acc'] == d['val_masked_acc'] and n['val_loss'] == d['val_loss']


@pytest.fixture(scope='module')
def baron_annotated(baron, tmp_path_factory):
    """The Baron fixture with gene coordinates (GENCODE vM38) and Reactome gene sets, by prepare_data.py --annotate."""
    genome, gmt = SHARED / 'genome' / 'mouse_gencode_vM38_genes.csv.gz', SHARED / 'genesets' / 'mouse_reactome.gmt'
    if not genome.exists() or not gmt.exists():
        pytest.skip('gene table or gene sets not available')
    out = tmp_path_factory.mktemp('annotated') / 'baron'
    shutil.copytree(baron, out)
    run('prepare_data.py', f'--annotate={out}', f'--genome={genome}', f'--gene_sets={gmt}')
    return out


@pytest.mark.parametrize('masking,inputs', [('pathway', 'panel'), ('multiscale', 'expressed'),
                                            ('pathway', 'expressed')])
def test_pathway_and_multiscale_pretrain(baron_annotated, tmp_path, masking, inputs):
    out = tmp_path / 'out'
    result = run('train.py', f'--dataset={baron_annotated}', f'--out_dir={out}', *TINY, f'--masking={masking}',
                 '--max_iters=4', '--eval_interval=3', '--multiscale_weights=1,2,1',
                 *(V2 if inputs == 'expressed' else []))
    assert re.search(rf'masking={masking}: \d+ gene sets hold \d+ of the 385 genes', result.stdout)
    ckpt = state(out / 'ckpt.pt')
    assert all(np.isfinite(ckpt['history']['train_loss'])) and 0 <= ckpt['history']['val_masked_acc'][-1] <= 1
    assert ckpt['config']['masking'] == masking


def test_bad_masking_settings(baron, tmp_path):
    common = [f'--dataset={baron}', f'--out_dir={tmp_path}', *TINY, '--max_iters=1']
    user_error(run('train.py', *common, '--masking=span', check=False), 'masking must be one of')
    user_error(run('train.py', *common, '--masking=pathway', check=False), r'no annotation\.h5.*--annotate=')
    user_error(run('train.py', *common, '--masking=multiscale', '--multiscale_weights=1,1', check=False),
               'multiscale_weights must be three numbers')
    user_error(run('train.py', *common, '--masking=dynamic', '--mask_prob_min=0.4', check=False), 'mask_prob_min')
