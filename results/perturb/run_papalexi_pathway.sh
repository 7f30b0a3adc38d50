#!/bin/bash
# Papalexi knockouts, 5 folds, with pathway_enc: each target's Hallmark and Reactome gene sets join its perturbation
# vector (and the linear baseline's features)
cd "$(dirname "$0")/../.."
start=$(date +%s)
python perturb.py --input=../shared/data/perturb/papalexi2021_thp1_crispr_ko.h5ad --task=gene \
    --perturbation_key=target_gene --control_value=control --holdout=all --pathway_enc=True \
    --gene_sets=../shared/data/genesets/human_hallmark.gmt,../shared/data/genesets/human_reactome.gmt \
    --out_dir=results/perturb/papalexi_pathway > results/perturb/papalexi_pathway.log 2>&1
echo "exit $? wall $(( $(date +%s) - start )) s on $(nproc) cores, num_threads=1" >> results/perturb/papalexi_pathway.log
