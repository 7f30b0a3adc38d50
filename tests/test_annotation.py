"""Gene annotations: the gene-table and GMT parsers on the shared GENCODE and MSigDB files (genes checked against
their raw csv lines), the matching rules (version-free Ensembl ids, symbols, case, duplicates), the gene-set filters,
prepare_data.py --annotate and annotation during a normal prepare (meta.json's coverage against the arrays), the
Ensembl-id fixture, Dataset.annotation(), and one test per bad input."""
import gzip
import hashlib
import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import data
from conftest import SHARED, run_script, user_error
from data import UserError

if not SHARED.is_dir():
    pytest.skip(f'test data not found at {SHARED}', allow_module_level=True)
FIXTURES, GENOME, GENESETS = SHARED / 'fixtures', SHARED / 'genome', SHARED / 'genesets'
HUMAN, MOUSE = GENOME / 'human_gencode_v49_genes.csv.gz', GENOME / 'mouse_gencode_vM38_genes.csv.gz'
MOUSE_GMT = f'{GENESETS / "mouse_hallmark.gmt"},{GENESETS / "mouse_reactome.gmt"}'


def prepare(*args, check=True):
    return run_script('prepare_data.py', *args, check=check)


@pytest.fixture(scope='module')
def human():
    return data.read_genome_table(HUMAN)


@pytest.fixture(scope='module')
def mouse():
    return data.read_genome_table(MOUSE)


def write_table(path, rows, header='gene_id,gene_name,biotype,chromosome,start,end'):
    text = '\n'.join([header] + [','.join(map(str, r)) for r in rows]) + '\n'
    if str(path).endswith('.gz'):
        with gzip.open(path, 'wt') as f:
            f.write(text)
    else:
        Path(path).write_text(text)
    return path


def row_of(table, gene_id):
    i = table.gene_id.index(gene_id)
    return table.gene_name[i], table.biotype[i], table.chromosome[i], int(table.start[i]), int(table.end[i])


# ------------------------------------------------------------------------------------------------ parsers
def test_genome_table_human_and_mouse(human, mouse):
    # the raw lines, from zcat ... | grep
    assert row_of(human, 'ENSG00000111640.16') == ('GAPDH', 'protein_coding', 'chr12', 6534012, 6538930)
    assert row_of(human, 'ENSG00000141510.20') == ('TP53', 'protein_coding', 'chr17', 7661779, 7687546)
    assert row_of(human, 'ENSG00000229807.15') == ('XIST', 'lncRNA', 'chrX', 73820649, 73852714)
    assert row_of(human, 'ENSG00000198804.2') == ('MT-CO1', 'protein_coding', 'chrM', 5904, 7445)
    assert row_of(mouse, 'ENSMUSG00000035804.6') == ('Ins1', 'protein_coding', 'chr19', 52252735, 52253914)
    assert row_of(mouse, 'ENSMUSG00000000394.16') == ('Gcg', 'protein_coding', 'chr2', 62304874, 62313994)
    assert row_of(mouse, 'ENSMUSG00000051951.6') == ('Xkr4', 'protein_coding', 'chr1', 3276124, 3741721)
    with gzip.open(HUMAN, 'rt') as f:
        n_lines = sum(1 for _ in f)
    assert len(human.gene_id) == n_lines - 1 == 78691 and human.start.dtype == np.int64
    assert human.gene_id[0] == 'ENSG00000290825.2' and len(mouse.gene_id) == 78275


def test_genome_table_plain_or_gzip(human, tmp_path):
    plain = tmp_path / 'human.csv'
    with gzip.open(HUMAN, 'rb') as f:
        plain.write_bytes(f.read())
    again = data.read_genome_table(plain)
    assert again.gene_id == human.gene_id and again.chromosome == human.chromosome
    np.testing.assert_array_equal(again.end, human.end)
    # columns in another order, an extra column: found by name
    table = data.read_genome_table(write_table(tmp_path / 't.csv.gz', [('chr2', 'X1', 5, 'G1.3', 'lncRNA', 9, 'y')],
                                               'chromosome,gene_name,start,gene_id,biotype,end,extra'))
    assert (table.gene_id, table.gene_name, table.biotype, table.chromosome) == (['G1.3'], ['X1'], ['lncRNA'], ['chr2'])
    assert table.start.tolist() == [5] and table.end.tolist() == [9]


def test_gmt_files():
    for species, n_reactome in (('human', 1787), ('mouse', 1309)):
        for kind in ('hallmark', 'reactome'):
            path = GENESETS / f'{species}_{kind}.gmt'
            sets = data.read_gmt(path)
            assert len(sets) == len(path.read_text().splitlines()) == (50 if kind == 'hallmark' else n_reactome)
    human = dict(data.read_gmt(GENESETS / 'human_reactome.gmt'))
    assert human['REACTOME_2_LTR_CIRCLE_FORMATION'] == ['BANF1', 'HMGA1', 'LIG4', 'PSIP1', 'XRCC4', 'XRCC5', 'XRCC6']
    name, genes = data.read_gmt(GENESETS / 'mouse_hallmark.gmt')[0]
    assert name == 'HALLMARK_ADIPOGENESIS' and genes[:4] == ['Abca1', 'Abcb8', 'Acaa2', 'Acadl']


def test_gene_sets_of_several_files(tmp_path):
    (tmp_path / 'a.gmt').write_text('S1\tdesc\tG1\tG2\nSHARED\t\tG1\n')
    (tmp_path / 'b.gmt').write_text('SHARED\thttp://x\tG3\tG3\tG4\n\nS2\tdesc\n')  # a repeated gene, a blank line
    sets, per_file = data.read_gene_sets([str(tmp_path / 'a.gmt'), str(tmp_path / 'b.gmt')])
    assert per_file == [2, 2]
    assert sets == [('S1', ['G1', 'G2']), ('a:SHARED', ['G1']), ('b:SHARED', ['G3', 'G4']), ('S2', [])]


# ------------------------------------------------------------------------------------------------ matching
def test_match_by_version_free_id_symbol_and_case(human):
    vocab = ['ENSG00000141510', 'ENSG00000111640.3', 'ENSG00000198804.2', 'XIST', 'gapdh', 'Tp53', 'NOT_A_GENE', '']
    annotation, coverage = data.annotate_genes(vocab, human)
    names = annotation['chrom_names']
    assert names == ['chr12', 'chr17', 'chrX', 'chrM']  # only the vocab's chromosomes, in natural order
    assert [names[c - 1] if c else None for c in annotation['chrom']] == \
        ['chr17', 'chr12', 'chrM', 'chrX', 'chr12', 'chr17', None, None]
    assert annotation['start'].tolist() == [7661779, 6534012, 5904, 73820649, 6534012, 7661779, -1, -1]
    assert annotation['end'].tolist() == [7687546, 6538930, 7445, 73852714, 6538930, 7687546, -1, -1]
    assert (coverage['by_id'], coverage['by_symbol'], coverage['case_insensitive'], coverage['unknown']) == (3, 1, 2, 2)


def test_duplicates_and_ambiguous_case(human, mouse, tmp_path):
    # real duplicates: PAR genes (chrX and chrY rows: chrX comes first), a lncRNA listed before the coding gene of
    # the same name (CAST, Lrrc7), several coding rows (Ndor1: the first)
    annotation, _ = data.annotate_genes(['CD99', 'SHOX', 'CAST', 'ENSG00000292348'], human)
    chrom = [annotation['chrom_names'][c - 1] for c in annotation['chrom']]
    assert chrom == ['chrX', 'chrX', 'chr5', 'chrY'] and annotation['start'].tolist()[:3] == [2690988, 624344, 96247756]
    annotation, _ = data.annotate_genes(['Lrrc7', 'Ndor1'], mouse)
    assert annotation['start'].tolist() == [157788528, 25134831]
    # two non-coding rows: the first; names differing only in case: exact matches only
    table = data.read_genome_table(write_table(tmp_path / 't.csv', [
        ('E1', 'Foo', 'lncRNA', 'chr3', 10, 20), ('E2', 'Foo', 'snRNA', 'chr4', 30, 40),
        ('E3', 'Abc', 'protein_coding', 'chr1', 1, 2), ('E4', 'ABC', 'protein_coding', 'chr2', 3, 4)]))
    annotation, coverage = data.annotate_genes(['Foo', 'abc', 'ABC', 'FOO'], table)
    assert annotation['start'].tolist() == [10, -1, 3, 10] and coverage['unknown'] == 1
    assert coverage['case_insensitive'] == 1 and annotation['chrom_names'] == ['chr2', 'chr3']


def test_pathways_filters_and_unknown_genes(tmp_path):
    table = data.read_genome_table(write_table(tmp_path / 't.csv', [
        ('ENSG1.1', 'A', 'protein_coding', 'chr1', 1, 2), ('ENSG2.1', 'B', 'protein_coding', 'chr1', 5, 6)]))
    sets = [('TWO', ['A', 'B', 'Z']), ('THREE', ['a', 'B', 'C', 'Q']), ('FOUR', ['A', 'B', 'C', 'D']),
            ('NONE', ['Y'])]
    vocab = ['ENSG1', 'B', 'C', 'D', 'UNKNOWN']  # ENSG1 is in a set through the table's symbol, A
    annotation, coverage = data.annotate_genes(vocab, table, sets, min_set_genes=3, max_set_genes=3)
    assert annotation['pathway_names'] == ['THREE']  # the bounds are inclusive: 2 and 4 genes are out
    annotation, coverage = data.annotate_genes(vocab, table, sets, min_set_genes=2, max_set_genes=4)
    assert annotation['pathway_names'] == ['TWO', 'THREE', 'FOUR']
    ptr, idx = annotation['pathway_ptr'], annotation['pathway_idx']
    members = [idx[ptr[i]:ptr[i + 1]].tolist() for i in range(len(vocab))]
    assert members == [[0, 1, 2], [0, 1, 2], [1, 2], [2], []] and idx.dtype == np.int32 and ptr.dtype == np.int64
    assert annotation['chrom'].tolist() == [1, 1, 0, 0, 0] and annotation['start'].tolist() == [1, 5, -1, -1, -1]
    assert coverage['sets_read'] == 4 and coverage['sets_kept'] == 3 and coverage['genes_in_a_set'] == 4
    assert coverage['mean_sets_per_gene'] == 9 / 4
    # no table: every gene unknown, and an Ensembl id has no symbol to look up in the sets
    annotation, coverage = data.annotate_genes(vocab, None, sets, 1, 10)
    assert annotation['chrom'].tolist() == [0] * 5 and annotation['chrom_names'] == [] and coverage['unknown'] == 5
    assert np.diff(annotation['pathway_ptr']).tolist() == [0, 3, 2, 1, 0]


# ------------------------------------------------------------------------------------------------ prepare_data.py
def check_annotation(path, meta):
    """Dataset.annotation() has the documented types, and meta.json's coverage is what its arrays say."""
    ds = data.Dataset(path)
    a = ds.annotation()
    assert ds.annotation() is a  # cached
    for key in ('chrom', 'start', 'end', 'pathway_ptr', 'pathway_idx'):
        assert a[key].dtype == np.int64, key
    assert isinstance(a['chrom_names'], list) and isinstance(a['pathway_names'], list)
    with h5py.File(path / 'annotation.h5') as f:
        assert {k: f[k].dtype for k in f} == {'chrom': np.int16, 'chrom_names': object, 'start': np.int64,
                                              'end': np.int64, 'pathway_ptr': np.int64, 'pathway_idx': np.int32,
                                              'pathway_names': object}
    known = a['chrom'] > 0
    assert (a['start'][~known] == -1).all() and (a['end'][~known] == -1).all() and (a['start'][known] >= 1).all()
    assert len(a['chrom_names']) == meta['n_chrom'] and set(a['chrom'][known]) == set(range(1, meta['n_chrom'] + 1))
    assert meta['by_id'] + meta['by_symbol'] + meta['case_insensitive'] == known.sum()
    assert meta['unknown'] == (~known).sum() and meta['n_genes'] == ds.n_genes
    per_gene = np.diff(a['pathway_ptr'])
    assert meta['sets_kept'] == len(a['pathway_names']) and meta['genes_in_a_set'] == (per_gene > 0).sum()
    assert meta['mean_sets_per_gene'] == pytest.approx(per_gene.sum() / max((per_gene > 0).sum(), 1))
    for i in np.flatnonzero(per_gene):
        ids = a['pathway_idx'][a['pathway_ptr'][i]:a['pathway_ptr'][i + 1]]
        assert (np.diff(ids) > 0).all()
    if len(a['pathway_names']):  # every kept set holds min_set_genes..max_set_genes vocab genes
        sizes = np.bincount(a['pathway_idx'], minlength=len(a['pathway_names']))
        assert meta['min_set_genes'] <= sizes.min() and sizes.max() <= meta['max_set_genes']
    return ds, a


def test_annotate_existing_dataset(baron, tmp_path):
    path = tmp_path / 'baron'
    shutil.copytree(baron, path)
    before = {f: (path / f).read_bytes() for f in ('data.h5', 'vocab.txt')}
    meta_before = json.loads((path / 'meta.json').read_text())
    result = prepare(f'--annotate={path}', f'--genome={MOUSE}', f'--gene_sets={MOUSE_GMT}')
    meta = json.loads((path / 'meta.json').read_text())
    entry = meta.pop('annotation')
    assert meta == meta_before and before == {f: (path / f).read_bytes() for f in before}
    assert sorted(p.name for p in path.iterdir()) == ['annotation.h5', 'data.h5', 'meta.json', 'vocab.txt']
    assert entry['genome'] == {'path': str(MOUSE), 'sha256': hashlib.sha256(MOUSE.read_bytes()).hexdigest(),
                               'n_rows': 78275}
    assert [g['path'] for g in entry['gene_sets']] == MOUSE_GMT.split(',') and entry['sets_read'] == 50 + 1309
    assert [g['n_sets'] for g in entry['gene_sets']] == [50, 1309]
    ds, a = check_annotation(path, entry)
    assert entry['by_symbol'] > 0.9 * ds.n_genes and entry['by_id'] == 0 and 0 < entry['sets_kept'] < 1359
    assert f"{ds.n_genes - entry['unknown']} / {ds.n_genes} genes located" in result.stdout
    assert f"{entry['sets_kept']} of 1359 gene sets kept" in result.stdout
    ins1 = ds.vocab.index('Ins1')
    assert a['chrom_names'][a['chrom'][ins1] - 1] == 'chr19'
    assert (a['start'][ins1], a['end'][ins1]) == (52252735, 52253914)
    # every gene's sets against a plain reading of the GMT lines (the vocab's symbols are the files' exact symbols)
    reference = [(fields[0], set(fields[2:])) for p in MOUSE_GMT.split(',')
                 for fields in (line.rstrip('\n').split('\t') for line in open(p))]
    reference = [(name, genes) for name, genes in reference if 3 <= sum(g in genes for g in ds.vocab) <= 500]
    assert a['pathway_names'] == [name for name, _ in reference]
    for i, gene in enumerate(ds.vocab):
        assert a['pathway_idx'][a['pathway_ptr'][i]:a['pathway_ptr'][i + 1]].tolist() == \
            [k for k, (_, genes) in enumerate(reference) if gene in genes]
    ins1_sets = a['pathway_idx'][a['pathway_ptr'][ins1]:a['pathway_ptr'][ins1 + 1]]
    assert 'REACTOME_SIGNALING_BY_INSULIN_RECEPTOR' in [a['pathway_names'][k] for k in ins1_sets]

    # again with the genome only: the pathways are there, empty, and meta.json says no gene sets were given
    prepare(f'--annotate={path}', f'--genome={MOUSE}')
    entry = json.loads((path / 'meta.json').read_text())['annotation']
    assert entry['gene_sets'] == [] and entry['sets_read'] == entry['sets_kept'] == entry['genes_in_a_set'] == 0
    _, a = check_annotation(path, entry)
    assert a['pathway_names'] == [] and (a['pathway_ptr'] == 0).all() and (a['chrom'] > 0).any()
    # the gene sets only: every chromosome unknown
    result = prepare(f'--annotate={path}', f'--gene_sets={MOUSE_GMT}', '--min_set_genes=5', '--max_set_genes=50')
    entry = json.loads((path / 'meta.json').read_text())['annotation']
    assert entry['genome'] is None and entry['unknown'] == 385 and 'no --genome given' in result.stdout
    _, a = check_annotation(path, entry)
    assert a['chrom_names'] == [] and (a['chrom'] == 0).all() and (a['start'] == -1).all() and a['pathway_names']


def test_annotation_during_prepare(baron, tmp_path):
    out = tmp_path / 'annotated'
    prepare(f'--input={FIXTURES / "counts_csr.h5ad"}', f'--out_dir={out}', '--label_key=cell_type', '--min_genes=10',
            f'--genome={MOUSE}', f'--gene_sets={MOUSE_GMT}')
    entry = json.loads((out / 'meta.json').read_text())['annotation']
    _, a = check_annotation(out, entry)
    shutil.copytree(baron, tmp_path / 'later')  # the same data annotated afterwards: the same annotation
    prepare(f'--annotate={tmp_path / "later"}', f'--genome={MOUSE}', f'--gene_sets={MOUSE_GMT}')
    b = data.Dataset(tmp_path / 'later').annotation()
    assert all(np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a)
    assert not (baron / 'annotation.h5').exists()  # without --genome/--gene_sets, no annotation
    with pytest.raises(UserError, match=r'has no gene annotation: run python prepare_data.py --annotate=.* --genome='):
        data.Dataset(baron).annotation()


def test_ensembl_ids_matched_by_id(tmp_path):
    # the var index holds Ensembl ids (no version; the table's have one), var['gene_symbols'] the symbols
    common = [f'--input={FIXTURES / "pbmc_ensembl_ids.h5ad"}', '--min_genes=0', f'--genome={HUMAN}',
              f'--gene_sets={GENESETS / "human_hallmark.gmt"},{GENESETS / "human_reactome.gmt"}']
    prepare(*common, f'--out_dir={tmp_path / "ids"}')
    prepare(*common, f'--out_dir={tmp_path / "symbols"}', '--gene_key=gene_symbols')
    by_id, by_symbol = (json.loads((tmp_path / d / 'meta.json').read_text())['annotation'] for d in ('ids', 'symbols'))
    assert (by_id['by_id'], by_id['by_symbol'], by_id['unknown']) == (699, 0, 0)
    assert (by_symbol['by_id'], by_symbol['by_symbol']) == (0, 699)
    _, a = check_annotation(tmp_path / 'ids', by_id)
    _, b = check_annotation(tmp_path / 'symbols', by_symbol)
    assert by_id['genes_in_a_set'] > 300  # the table's symbol of each id finds its gene sets: the same as by symbol
    assert all(np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a)


def test_corrupt_annotation(baron, tmp_path):
    path = tmp_path / 'baron'
    shutil.copytree(baron, path)
    prepare(f'--annotate={path}', f'--genome={MOUSE}')
    with h5py.File(path / 'annotation.h5', 'a') as f:
        del f['start']
        f['start'] = np.zeros(3, np.int64)
    with pytest.raises(UserError, match=r'annotation.h5 is corrupt .*385.*--annotate='):
        data.Dataset(path).annotation()
    (path / 'annotation.h5').write_bytes(b'not hdf5')
    with pytest.raises(UserError, match='annotation.h5 is corrupt'):
        data.Dataset(path).annotation()


# ------------------------------------------------------------------------------------------------ bad input
def assert_user_error(result, *fragments):
    """conftest's user_error, the line naming every fragment, and that line the last on stderr."""
    user_error(result, ''.join(f'(?=.*{re.escape(f)})' for f in fragments))
    assert result.stderr.strip().splitlines()[-1].startswith('error: ') and result.stderr.count('error:') == 1


def bad_files(tmp_path):
    write_table(tmp_path / 'no_biotype.csv', [('E1', 'A', 'chr1', 1, 2)], 'gene_id,gene_name,chromosome,start,end')
    write_table(tmp_path / 'float.csv.gz', [('E1', 'A', 'protein_coding', 'chr1', 1, 2),
                                            ('E2', 'B', 'protein_coding', 'chr1', '1.5e3', 2000)])
    (tmp_path / 'short.gmt').write_text('S1\tdesc\tA\tB\nLONELY_NAME\n')
    return tmp_path


@pytest.mark.parametrize('args, fragments', [
    (['--genome={tmp}/missing.csv.gz'], ['gene table', 'missing.csv.gz not found', '--genome=']),
    (['--genome={tmp}/no_biotype.csv'], ['has no column biotype', '--genome=']),
    (['--genome={tmp}/float.csv.gz'], ["start '1.5e3' of gene E2", 'not an integer']),
    (['--genome={tmp}/short.gmt'], ['has no column gene_id']),
    (['--gene_sets={tmp}/short.gmt'], ['short.gmt line 2 has 1 tab-separated field', 'name<TAB>description']),
    (['--gene_sets={tmp}/missing.gmt'], ['missing.gmt not found', '--gene_sets=']),
    (['--gene_sets={tmp}/short.gmt,{tmp}/short.gmt'], ['lists a file twice']),
    (['--genome=' + str(MOUSE), '--min_set_genes=0'], ['--min_set_genes=3']),
    (['--genome=' + str(MOUSE), '--min_set_genes=50', '--max_set_genes=10'], ['--max_set_genes=500']),
    ([], ['needs --genome=', '--gene_sets=']),
    (['--genome=' + str(MOUSE), f'--input={FIXTURES / "counts_csr.h5ad"}'], ['reads no .h5ad', 'drop --input=']),
])
def test_bad_annotate(baron, tmp_path, args, fragments):
    bad_files(tmp_path)
    path = tmp_path / 'baron'
    shutil.copytree(baron, path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    result = prepare(f'--annotate={path}', *[a.format(tmp=tmp_path) for a in args], check=False)
    assert_user_error(result, *fragments)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # nothing written, no temporary files left


def test_annotate_not_a_dataset(baron, tmp_path):
    for target in (tmp_path / 'missing', baron / 'vocab.txt', tmp_path):
        result = prepare(f'--annotate={target}', f'--genome={MOUSE}', check=False)
        assert_user_error(result, 'is not a prepared dataset', '--annotate=<a directory written by prepare_data.py>')
    assert list(tmp_path.iterdir()) == []
    shutil.copytree(baron, tmp_path / 'broken')
    (tmp_path / 'broken' / 'vocab.txt').write_text('A\nB\n')
    result = prepare(f'--annotate={tmp_path / "broken"}', f'--genome={MOUSE}', check=False)
    assert_user_error(result, 'is corrupt', '2 genes in vocab.txt, meta.json says 385', '--out_dir=')
    assert not (tmp_path / 'broken' / 'annotation.h5').exists()


@pytest.mark.parametrize('args, fragments', [
    (['--genome={tmp}/float.csv.gz'], ['not an integer']),
    (['--gene_sets={tmp}/short.gmt'], ['line 2 has 1 tab-separated field']),
])
def test_bad_annotation_during_prepare(tmp_path, args, fragments):
    bad_files(tmp_path)
    out = tmp_path / 'out'
    result = prepare(f'--input={FIXTURES / "counts_csr.h5ad"}', f'--out_dir={out}', '--label_key=cell_type',
                     *[a.format(tmp=tmp_path) for a in args], check=False)
    assert_user_error(result, *fragments)
    assert not out.exists() and not list(tmp_path.glob('out.*'))
